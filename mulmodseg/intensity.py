"""The intensity transforms of nnU-Net v2's training augmentation, on one crop at a time, in torch.

``apply_intensity`` applies a batch's per-row draws (``mulmodseg.augment.draw_params``) in nnU-Net's order.
The separable ones (Gaussian blur, low-resolution simulation) are one matrix product per axis
(``along_axes``); contrast and gamma keep nnU-Net's range and statistics rules, folded into one multiply-add.
Imports only torch and numpy: it can be copied out with ``augment.py``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def apply_intensity(x: torch.Tensor, params: Any, max_blur_sigma: float, retain_stats: bool) -> torch.Tensor:
    """x (B, 1, X, Y, Z) with the intensity transforms each row drew (``params``: ``augment.RowParams``, per-row
    numpy arrays) in nnU-Net's order: noise, blur, brightness, contrast, low resolution, inverted gamma, gamma
    (``retain_stats``: mean and std restored). Every blur has the taps of the largest sigma it can draw,
    ``max_blur_sigma``. Row by row, each written in place by its last operation: the statistics these transforms
    take (mean, std, range) are then each row's own sums, whatever the batch."""
    shape = x.shape[1:]
    blur_radius = max(1, math.ceil(3.0 * max_blur_sigma))  # nnU-Net's 3 sigma
    for row in np.flatnonzero(params.noise):
        generator = torch.Generator().manual_seed(int(params.noise_seed[row]))
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        x[row].add_(noise.to(x.device, x.dtype), alpha=float(params.noise_std[row]))
    for row in np.flatnonzero(params.blur):
        gaussian_blur(x[row, 0], params.blur_sigma[row], blur_radius, out=x[row, 0])
    for row in np.flatnonzero(params.brightness):
        x[row].mul_(float(params.brightness_factor[row]))
    for row in np.flatnonzero(params.contrast):
        contrast(x[row], float(params.contrast_factor[row]), out=x[row])
    for row in np.flatnonzero(params.lowres):
        simulate_low_resolution(x[row, 0], params.lowres_zoom[row], out=x[row, 0])
    for row in np.flatnonzero(params.gamma_inverted):
        gamma(x[row], float(params.gamma_inverted_value[row]), retain_stats, invert=True, out=x[row])
    for row in np.flatnonzero(params.gamma):
        gamma(x[row], float(params.gamma_value[row]), retain_stats, out=x[row])
    return x


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float], radius: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x (X, Y, Z) blurred by separable Gaussians of sigmas[a] voxels along axis a, taps -radius..radius
    normalised to sum 1, reflected borders (nnU-Net's), as one matrix product per axis (see `along_axes`)."""
    matrices = [blur_matrix(size, float(sigma), radius) for size, sigma in zip(x.shape, sigmas)]
    return along_axes(x, matrices, out=out)


def blur_matrix(size: int, sigma: float, radius: int) -> np.ndarray:
    """(size, size) float64: the Gaussian of `sigma` voxels, taps -radius..radius summing to 1, with
    F.pad's "reflect" border (index -1 reads 1) folded in."""
    r = min(radius, size - 1)
    taps = np.arange(-r, r + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    source = np.arange(size)[:, None] + taps[None, :]
    source = np.abs(source)
    source = np.where(source > size - 1, 2 * (size - 1) - source, source)
    out = np.zeros((size, size))
    np.add.at(out, (np.repeat(np.arange(size), len(taps)), source.ravel()), np.tile(weights, size))
    return out


def along_axes(x: torch.Tensor, matrices: Sequence[np.ndarray], out: torch.Tensor | None = None) -> torch.Tensor:
    """x (X, Y, Z) with matrices[a] (size_a, size_a) applied along axis a: three matrix products. Fewer,
    larger operations than a weighted sum of shifted views (one op per tap): on a CPU whose other cores are
    busy, every parallel op waits for them, so op count, not arithmetic, sets the time (a 7-tap blur of
    64^3 measured 196 ms as shifted views and 40 ms as matrix products with 2 threads there, 4.1 and 1.5 ms
    with 1 thread). Each row's products have the same shapes whatever the batch, so results are per-row
    deterministic."""
    m = [torch.tensor(matrix, dtype=x.dtype, device=x.device) for matrix in matrices]
    shape = x.shape
    x = (m[0] @ x.reshape(shape[0], -1)).reshape(shape)  # along axis 0
    x = m[1] @ x  # along axis 1, batched over axis 0
    return torch.matmul(x, m[2].T, out=out)  # along axis 2 (into `out`, which may be the input)


def contrast(x: torch.Tensor, factor: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) * factor + mean, clipped to x's former [min, max] (nnU-Net's preserve_range)."""
    mean = x.mean()
    low, high = torch.aminmax(x)
    return torch.add(mean * (1.0 - factor), x, alpha=factor, out=out).clamp_(low, high)


def gamma(x: torch.Tensor, value: float, retain_stats: bool, invert: bool = False,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """nnU-Net's GammaTransform: x rescaled to [0, 1] over its range, raised to `value`, scaled back; with
    `retain_stats` then shifted and scaled to its former mean and (unbiased) std. `invert`: the same on -x,
    negated back (nnU-Net's p_invert_image). The rescaling steps are folded into one multiply-add at each
    end (the scaling back to the range cancels when the statistics are restored)."""
    low, high = torch.aminmax(x)
    span = high - low
    # rescaled to [0, 1]; -x over its range [-high, -low] when inverted (a difference first, so never < 0)
    base = (torch.sub(high, x) if invert else x - low).div_(span.clamp_min(1e-7)).pow_(value)
    sign = -1.0 if invert else 1.0
    if not retain_stats:  # base * span + min of (+-x), negated back
        return torch.addcmul(high if invert else low, base, sign * span, out=out)
    mean, std = mean_std(x)  # -x has mean -mean and the same std
    base_mean, base_std = mean_std(base)
    gain = span * std / (base_std * span).clamp_min(1e-7)
    return torch.addcmul(mean - sign * gain * base_mean, base, sign * gain, out=out)


def mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std, two passes (10x faster on the CPU than torch.std_mean's Welford pass)."""
    mean = x.mean()
    centred = (x - mean).view(-1)
    return mean, (torch.dot(centred, centred) / max(x.numel() - 1, 1)).sqrt()


def low_resolution_matrix(size: int, zoom: float) -> np.ndarray:
    """(size, size) float64 matrix: nearest-exact downsampling to round(size * zoom) voxels, then linear
    upsampling back (align_corners=False): F.interpolate's two steps as one linear map along one axis."""
    small = max(1, round(size * zoom))
    down = np.minimum(np.floor((np.arange(small) + 0.5) * (size / small)).astype(int), size - 1)
    source = np.maximum((np.arange(size) + 0.5) * (small / size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(source).astype(int), small - 1)
    i1 = np.minimum(i0 + 1, small - 1)
    frac = np.clip(source - i0, 0.0, 1.0)
    up = np.zeros((size, small))
    np.add.at(up, (np.arange(size), i0), 1.0 - frac)
    np.add.at(up, (np.arange(size), i1), frac)
    select = np.zeros((small, size))
    select[np.arange(small), down] = 1.0
    return up @ select


def simulate_low_resolution(x: torch.Tensor, zooms: Sequence[float], out: torch.Tensor | None = None) -> torch.Tensor:
    """x (X, Y, Z) downsampled (nearest) by zooms[a] along axis a and upsampled back (trilinear), as nnU-Net's
    SimulateLowResolutionTransform, as one matrix product per axis (`along_axes`): rows with different zooms
    then cost the same and need no intermediate shapes."""
    matrices = [low_resolution_matrix(size, float(zoom)) for size, zoom in zip(x.shape, zooms)]
    return along_axes(x, matrices, out=out)
