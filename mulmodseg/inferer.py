"""Sliding-window inference over whole volumes, numerically matching MONAI's ``sliding_window_inference``.

Window layout (as MONAI): along each spatial axis the step is ``max(int(roi * (1 - overlap)), 1)``,
windows start at ``0, step, 2*step, ...`` until one reaches the end, and the last start is pulled back
to ``size - roi`` so every window lies inside the (padded) image. Windows are enumerated in C order
(last axis fastest), image by image, and consecutive windows are run ``sw_batch_size`` at a time,
across image boundaries. Every window's output is multiplied by an importance map, added into the
output, and the sum is divided by the summed importance maps. Inputs smaller than the ROI along an
axis are padded (half before, the rest after) and the output is cropped back.

Beyond MONAI: the output can be accumulated on another device than the one the windows run on
(``sw_device="cuda", device="cpu"`` keeps GPU memory independent of the volume size), flip test-time
augmentation, autocast, and a progress callback.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["sliding_window_inference", "gaussian_importance_map", "window_starts"]

Progress = Union[bool, Callable[[int, int], None]]


def gaussian_importance_map(
    roi_size: Sequence[int],
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Separable Gaussian weights, float32 of shape ``roi_size``, centred on the window.

    sigma along an axis is ``sigma_scale * roi``; values below ``max(min(map), 1e-3)`` are raised to
    that floor (as MONAI does), so window corners still get a small, non-zero weight.
    """
    scales = _per_axis(sigma_scale, len(roi_size), "sigma_scale")
    weights = None
    for size, scale in zip(roi_size, scales):
        sigma = size * scale
        # Offsets from the centre are exact half-integers, so this equals any other way of writing them.
        offset = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
        profile = torch.exp(offset**2 / (-2 * sigma**2))
        # Multiply the axes in order (not all at once) so float rounding matches the reference.
        weights = profile if weights is None else weights.unsqueeze(-1) * profile
    return weights.clamp_(min=max(weights.min().item(), 1e-3))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis with ``roi <= size`` (see the module docstring)."""
    step = max(int(roi * (1 - overlap)), 1)
    count = math.ceil((size - roi) / step) + 1
    return [min(i * step, size - roi) for i in range(count)]


@torch.no_grad()
def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: int | Sequence[int],
    predictor: Callable[..., torch.Tensor],
    sw_batch_size: int = 4,
    overlap: float | Sequence[float] = 0.5,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: Progress = False,
    *,
    tta_flips: bool | Sequence[int] = False,
    autocast_dtype: torch.dtype | None = None,
    **predictor_kwargs,
) -> torch.Tensor:
    """Run ``predictor`` on overlapping windows of ``inputs`` and blend the outputs.

    inputs: (B, C, *S) on any device, S of 2 or 3 axes. roi_size: an int for every axis, or one size per
    axis where ``None``/``<= 0`` means the whole axis. predictor: ``(n, C, *roi) -> (n, K, *roi)``, called
    as ``predictor(windows, **predictor_kwargs)`` with ``n <= sw_batch_size`` windows on ``sw_device``.
    overlap: fraction in [0, 1), one or per axis. mode: ``"gaussian"`` or ``"constant"`` blending.
    padding_mode: ``torch.nn.functional.pad`` mode (``"constant"`` with ``cval``, ``"reflect"``,
    ``"replicate"``, ``"circular"``) for axes shorter than the ROI. sw_device: where windows and the
    predictor run (default: the inputs' device). device: where the output is accumulated and returned
    (default: the inputs' device). progress: ``True`` for a stderr line with an ETA, or a callable
    ``(windows_done, windows_total)``. tta_flips: also run every combination of flips of the spatial
    axes (``True``: all, 2**len(S) passes, 8 in 3-D, identity included; or the spatial axes to flip,
    e.g. ``(1, 2)``), flip each output back and average them.
    autocast_dtype: ``torch.bfloat16``/``torch.float16`` to run the predictor under ``torch.autocast``.

    Returns (B, K, *S) float32 on ``device``: the blended predictor outputs (logits if the predictor
    returns logits). Gradients are not tracked.
    """
    if not isinstance(sw_batch_size, numbers.Integral) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}")
    spatial_dims = inputs.dim() - 2
    if not isinstance(roi_size, numbers.Number) and len(roi_size) != spatial_dims:
        raise ValueError(f"roi_size {tuple(roi_size)} does not fit inputs of shape {tuple(inputs.shape)}")
    if mode not in ("gaussian", "constant"):
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    overlaps = _per_axis(overlap, spatial_dims, "overlap")
    if any(not 0 <= o < 1 for o in overlaps):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device

    batch, _, *image_size = inputs.shape
    roi = tuple(
        size if r is None or r <= 0 else int(r)
        for size, r in zip(image_size, _per_axis(roi_size, spatial_dims, "roi_size"))
    )
    before = [max(r - s, 0) // 2 for r, s in zip(roi, image_size)]
    after = [max(r - s, 0) - b for r, s, b in zip(roi, image_size, before)]
    if any(before) or any(after):
        pad = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]  # last axis first
        inputs = F.pad(inputs, pad, mode=padding_mode, value=cval)
    padded_size = inputs.shape[2:]

    starts = [window_starts(s, r, o) for s, r, o in zip(padded_size, roi, overlaps)]
    windows = [tuple(slice(s, s + r) for s, r in zip(corner, roi)) for corner in itertools.product(*starts)]
    jobs = [(b, w) for b in range(batch) for w in windows]

    if mode == "gaussian":
        weight = gaussian_importance_map(roi, sigma_scale, sw_device)
    else:
        weight = torch.ones(roi, dtype=torch.float32, device=sw_device)
    weight_out = weight.to(device)
    weight_sum = torch.zeros(padded_size, dtype=torch.float32, device=device)
    for w in windows:
        weight_sum[w] += weight_out

    flip_axes = tuple(range(spatial_dims)) if tta_flips is True else tuple(tta_flips or ())
    if any(not 0 <= a < spatial_dims for a in flip_axes):
        raise ValueError(f"tta_flips {tuple(flip_axes)}: spatial axes are 0..{spatial_dims - 1}")
    predict = _Predict(predictor, predictor_kwargs, flip_axes, autocast_dtype, sw_device)
    report = _progress_reporter(progress, len(jobs))
    output = None
    for first in range(0, len(jobs), sw_batch_size):
        chunk = jobs[first : first + sw_batch_size]
        window_batch = torch.stack([inputs[(b, slice(None)) + w] for b, w in chunk]).to(sw_device)
        result = predict(window_batch)
        if result.shape[0] != len(chunk) or tuple(result.shape[2:]) != roi:
            raise ValueError(f"predictor returned {tuple(result.shape)} for windows {tuple(window_batch.shape)}")
        result = (result * weight).to(device)
        if output is None:
            output = torch.zeros((batch, result.shape[1], *padded_size), dtype=torch.float32, device=device)
        for (b, w), window_result in zip(chunk, result):
            output[(b, slice(None)) + w] += window_result
        report(first + len(chunk))

    output /= weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(before, image_size))
    return output[(slice(None), slice(None)) + crop]


class _Predict:
    """Calls the predictor on a window batch with optional autocast and flip TTA; returns float32."""

    def __init__(
        self,
        predictor: Callable[..., torch.Tensor],
        kwargs: dict,
        flip_axes: Sequence[int],
        autocast_dtype: torch.dtype | None,
        sw_device: torch.device,
    ) -> None:
        self.predictor = predictor
        self.kwargs = kwargs
        self.autocast_dtype = autocast_dtype
        self.device_type = sw_device.type
        self.flip_axes = flip_axes

    def _once(self, windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.predictor(windows, **self.kwargs).float()

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if not self.flip_axes:
            return self._once(windows)
        flip_sets = [axes for k in range(len(self.flip_axes) + 1) for axes in itertools.combinations(self.flip_axes, k)]
        total = self._once(windows)
        for axes in flip_sets[1:]:
            dims = [2 + a for a in axes]
            total += self._once(windows.flip(dims)).flip(dims)
        return total / len(flip_sets)


def _progress_reporter(progress: Progress, total: int) -> Callable[[int], None]:
    """Turns the ``progress`` argument into ``report(windows_done)``."""
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress:
        return lambda done: None
    started = time.monotonic()

    def report(done: int) -> None:
        elapsed = time.monotonic() - started
        eta = elapsed / done * (total - done)
        end = "\n" if done == total else ""
        percent = 100 * done // total
        # \x1b[K clears the rest of the line, so a shorter update leaves nothing of the longer one.
        sys.stderr.write(f"\r\x1b[Ksliding window {done}/{total} ({percent}%), {elapsed:.0f} s, ETA {eta:.0f} s{end}")
        sys.stderr.flush()

    return report


def _per_axis(value, n: int, name: str) -> tuple:
    """A scalar repeated n times, or a length-n sequence as a tuple."""
    if isinstance(value, numbers.Number) or value is None:
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{name} needs 1 or {n} values, got {value}")
    return tuple(value)
