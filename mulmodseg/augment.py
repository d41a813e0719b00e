"""nnU-Net v2's default training augmentation, batched, in torch, on the device the crops are on.

The loader cuts crops slightly larger than the training crop (`input_size`), centred where the training
crop is centred; `augment_batch` turns a batch of them into training crops in nnU-Net's order:

1. spatial: rotation about all three axes and isotropic scaling about the crop centre, for all rows that
   draw one in a single `F.grid_sample` call on the grid `F.affine_grid` would give (built as a cheaper
   broadcast sum; image trilinear, label nearest or one-hot linear; outside the input: image 0, label
   `label_fill`); rows that draw none are exact centre slices;
2. mirroring of each axis in `mirror_axes` (nnU-Net mirrors last; every later step commutes with a flip,
   so it is folded into the sampling grid of the warped rows for free). The label is mirrored with the
   image and keeps its classes, as in nnU-Net: a network tells a right kidney from a left one by the anatomy
   around it (the liver's side), which a mirror moves with it; renaming the paired classes of a mirrored crop
   would contradict that cue half of the time (docs/augmentation.md);
3. intensity: Gaussian noise, Gaussian blur, multiplicative brightness, contrast, low-resolution
   simulation, gamma of the inverted image, gamma.

Every row's random parameters come from `numpy.random.default_rng(key)` of that row's key (e.g. (seed,
epoch, modality, pass, rank, item, sample)), drawn in a fixed order whatever the probabilities, so a row's
output depends only on its key, its input and the settings: not on the other rows of the batch, the
device's random state or the batch size. Noise fields are drawn on the CPU from a `torch.Generator`
seeded from the row's stream, then moved: the same keys give the same noise on every device (a CUDA
generator's stream differs from the CPU's), and only about 1 row in 10 draws noise, so the copy is cheap.

Tensors are (B, C=1, X, Y, Z) with the spatial axes in RAS order (axis 0 = left/right). With
`mulmodseg.intensity` (the intensity transforms) it imports only torch, numpy and the standard library, so the
two can be copied out alone. docs/augmentation.md lists every number next to nnU-Net's and where ours differ.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from mulmodseg.intensity import apply_intensity

LABEL_MODES = ("nearest", "linear")


@dataclass(frozen=True)
class NnUNetAugment:
    """Probabilities and ranges of nnU-Net v2's default training augmentation (its values by default).

    Probabilities are per sample (row) unless named per channel; `*_range` fields are (low, high).
    A setting can be given as its value or as text ("0.3", "0.8:1.25", "0:1:2", "none", "true"), so
    `NnUNetAugment(**json.load(...))` and `from_overrides("rotation_p=0.3,scale_range=0.8:1.25")` both
    work; a bad value raises ValueError naming the field.
    """

    rotation_p: float = 0.2  # one draw per sample
    rotation_p_per_axis: float = 1.0  # when it rotates, each axis's angle is kept with this probability
    rotation_degrees: float = 30.0  # each angle U(-deg, deg)
    scale_p: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)  # sampling scale, same on all axes: > 1 shows more, smaller
    noise_p: float = 0.1
    noise_std_range: tuple[float, float] = (0.0, 0.1)  # nnU-Net calls it noise_variance but uses it as the std
    blur_p: float = 0.2
    blur_p_per_channel: float = 0.5  # with one channel: blurred with probability blur_p * this = 0.1
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)  # voxels, drawn per axis
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)  # multiplier; half the draws below 1, half above
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)  # around the mean, clipped to the crop's old range
    lowres_p: float = 0.25
    lowres_p_per_channel: float = 0.5  # with one channel: applied with probability 0.125
    lowres_zoom_range: tuple[float, float] = (0.5, 1.0)  # same on all axes
    gamma_inverted_p: float = 0.1  # gamma of the negated image (applied before the plain gamma)
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)  # half the draws below 1, half above
    gamma_retain_stats: bool = True  # mean and std restored after the gamma
    mirror_p: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    inplane_axis: int | None = None  # anisotropic crops: rotate only about it, neither scale nor zoom along it
    label_mode: str = "nearest"  # "nearest" or "linear" (one-hot linear, as nnU-Net; more memory)

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        self._check()

    def _check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"augmentation setting {name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_p") or f.name.endswith("_per_channel"):
                if not 0.0 <= value <= 1.0:
                    raise bad(f.name, "a probability must be in [0, 1]")
            elif f.name.endswith("_range"):
                low, high = value
                if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                    raise bad(f.name, "must be low:high with low <= high")
        minimum = {"scale_range": (0.0, False), "noise_std_range": (0.0, True), "blur_sigma_range": (0.0, False),
                   "brightness_range": (0.0, True), "contrast_range": (0.0, True), "lowres_zoom_range": (0.0, False),
                   "gamma_range": (0.0, False)}
        for name, (low, inclusive) in minimum.items():
            first = getattr(self, name)[0]
            if first < low or (first == low and not inclusive):
                raise bad(name, f"must be {'>=' if inclusive else '>'} {low}")
        if self.lowres_zoom_range[1] > 1.0:
            raise bad("lowres_zoom_range", "a zoom must be <= 1 (it simulates a lower resolution)")
        if not 0.0 <= self.rotation_degrees <= 180.0:
            raise bad("rotation_degrees", "must be in [0, 180]")
        if len(set(self.mirror_axes)) != len(self.mirror_axes) or any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise bad("mirror_axes", "must be distinct axes among 0, 1, 2")
        if self.inplane_axis is not None and self.inplane_axis not in (0, 1, 2):
            raise bad("inplane_axis", "must be 0, 1, 2 or none")
        if self.label_mode not in LABEL_MODES:
            raise bad("label_mode", f"must be one of {LABEL_MODES}")

    @classmethod
    def off(cls) -> NnUNetAugment:
        """Every probability 0: `augment_batch` then returns the exact centre crops."""
        return cls().with_overrides({f.name: 0.0 for f in fields(cls) if f.name.endswith("_p")})

    @classmethod
    def from_overrides(cls, text: str) -> NnUNetAugment:
        """nnU-Net's defaults changed by `text`, e.g. "rotation_p=0.3,scale_range=0.8:1.25,mirror_axes=0:1"."""
        return cls().with_overrides(parse_overrides(text))

    def with_overrides(self, changes: Mapping[str, object]) -> NnUNetAugment:
        """A copy with the named settings changed (values or text); unknown names raise ValueError."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return replace(self, **dict(changes))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready settings (tuples as lists) for config.json and checkpoints; `NnUNetAugment(**d)` reads them."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def parse_overrides(text: str) -> dict[str, str]:
    """"a=1,b=0.5:2" -> {"a": "1", "b": "0.5:2"} (values stay text; the dataclass converts and checks them)."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"augmentation override {item!r}: expected name=value")
        out[name.strip()] = value.strip()
    return out


def _coerce(name: str, kind: str, value: object) -> object:
    """`value` (itself or text) as the field's type `kind` (the annotation's text); ValueError naming `name`."""
    try:
        return _convert(kind, value)
    except (TypeError, ValueError):
        raise ValueError(f"augmentation setting {name}={value!r}: not a valid {kind}") from None


def _convert(kind: str, value: object) -> object:
    """TypeError or ValueError when `value` does not fit `kind`."""
    if kind == "bool":
        if isinstance(value, str):
            text = value.strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text in ("true", "1", "yes")
        if not isinstance(value, (bool, np.bool_, int)) or value not in (0, 1):
            raise TypeError(value)
        return bool(value)
    if kind == "float":
        number = _as_float(value)
        if not math.isfinite(number):
            raise ValueError(number)
        return number
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if kind == "int | None":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return _as_int(value)
    parts = value.split(":") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    if kind == "tuple[float, float]":
        if len(parts) != 2:
            raise ValueError(parts)
        return (_as_float(parts[0]), _as_float(parts[1]))
    if kind == "tuple[int, ...]":
        return tuple(_as_int(p) for p in parts if not (isinstance(p, str) and not p.strip()))
    raise AssertionError(f"unhandled setting type {kind}")


def _as_float(value: object) -> float:
    if isinstance(value, bool):  # True is an int to Python, not a number to a user
        raise TypeError(value)
    return float(value)  # type: ignore[arg-type]


def _as_int(value: object) -> int:
    number = _as_float(value)
    if int(number) != number:
        raise ValueError(value)
    return int(number)


@dataclass
class RowParams:
    """Per-row random parameters of one batch, numpy arrays with B rows. `spatial` = rotate | scale."""

    rotate: np.ndarray  # (B,) bool
    angles: np.ndarray  # (B, 3) radians about axes 0, 1, 2 (0 where not rotating)
    scale: np.ndarray  # (B, 3) sampling scale per axis (1 where not scaling)
    flip: np.ndarray  # (B, 3) bool
    noise: np.ndarray  # (B,) bool
    noise_std: np.ndarray  # (B,)
    noise_seed: np.ndarray  # (B,) int64, seeds the row's torch.Generator
    blur: np.ndarray  # (B,) bool
    blur_sigma: np.ndarray  # (B, 3) voxels
    brightness: np.ndarray  # (B,) bool
    brightness_factor: np.ndarray  # (B,)
    contrast: np.ndarray  # (B,) bool
    contrast_factor: np.ndarray  # (B,)
    lowres: np.ndarray  # (B,) bool
    lowres_zoom: np.ndarray  # (B, 3)
    gamma_inverted: np.ndarray  # (B,) bool
    gamma_inverted_value: np.ndarray  # (B,)
    gamma: np.ndarray  # (B,) bool
    gamma_value: np.ndarray  # (B,)

    @property
    def spatial(self) -> np.ndarray:
        return self.rotate | (self.scale != 1.0).any(1)


def _two_sided(rng: np.random.Generator, low: float, high: float) -> float:
    """nnU-Net's BGContrast sampling: with probability 1/2 U(low, 1), else U(max(low, 1), high) (when low < 1).
    Two numbers are drawn whatever the range, so the stream's position never depends on the settings."""
    side, t = rng.random(), rng.random()
    if side < 0.5 and low < 1.0:
        return low + t * (min(high, 1.0) - low)
    start = max(low, 1.0)
    return start + t * (high - start)


def draw_params(keys: Sequence[Sequence[int]], settings: NnUNetAugment) -> RowParams:
    """Row i's parameters from `numpy.random.default_rng(keys[i])`, always the same numbers drawn in the same
    order (so changing one probability changes no other transform's draws)."""
    rows = []
    for key in keys:
        key = [int(k) for k in key]
        if not key or min(key) < 0:
            raise ValueError(f"augmentation key {key}: needs one or more non-negative integers")
        rng = np.random.default_rng(key)
        u = rng.random(17)  # the apply/skip decisions
        angles = rng.uniform(-1.0, 1.0, 3) * math.radians(settings.rotation_degrees)
        scale = rng.uniform(*settings.scale_range)
        noise_std = rng.uniform(*settings.noise_std_range)
        noise_seed = int(rng.integers(2**63 - 1))
        sigma = rng.uniform(*settings.blur_sigma_range, size=3)
        brightness_factor = _two_sided(rng, *settings.brightness_range)
        contrast_factor = _two_sided(rng, *settings.contrast_range)
        zoom = rng.uniform(*settings.lowres_zoom_range)
        gamma_inverted_value = _two_sided(rng, *settings.gamma_range)
        gamma_value = _two_sided(rng, *settings.gamma_range)
        rotate, do_scale = u[0] < settings.rotation_p, u[1] < settings.scale_p
        angles = np.where(u[14:17] < settings.rotation_p_per_axis, angles, 0.0)
        scales, zooms = np.full(3, scale if do_scale else 1.0), np.full(3, zoom)
        if settings.inplane_axis is not None:  # nnU-Net's dummy-2D augmentation of anisotropic crops
            angles = np.where(np.arange(3) == settings.inplane_axis, angles, 0.0)
            scales[settings.inplane_axis] = zooms[settings.inplane_axis] = 1.0
        rows.append({
            "rotate": rotate, "angles": angles if rotate else np.zeros(3), "scale": scales,
            "flip": np.array([u[2 + a] < settings.mirror_p and a in settings.mirror_axes for a in range(3)]),
            "noise": u[5] < settings.noise_p, "noise_std": noise_std, "noise_seed": noise_seed,
            "blur": u[6] < settings.blur_p and u[7] < settings.blur_p_per_channel, "blur_sigma": sigma,
            "brightness": u[8] < settings.brightness_p, "brightness_factor": brightness_factor,
            "contrast": u[9] < settings.contrast_p, "contrast_factor": contrast_factor,
            "lowres": u[10] < settings.lowres_p and u[11] < settings.lowres_p_per_channel, "lowres_zoom": zooms,
            "gamma_inverted": u[12] < settings.gamma_inverted_p, "gamma_inverted_value": gamma_inverted_value,
            "gamma": u[13] < settings.gamma_p, "gamma_value": gamma_value})
    if not rows:
        raise ValueError("augmentation needs one key per batch row, got none")
    return RowParams(**{f.name: np.array([r[f.name] for r in rows]) for f in fields(RowParams)})


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """R = R2 @ R1 @ R0, Rk a rotation by angles[k] (radians) in the plane of the two other axes (nnU-Net's
    Rz @ Ry @ Rx with its x, y, z as our axes 0, 1, 2)."""
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = math.cos(angle)
        r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
        out = r @ out
    return out


def input_size(out_size: Sequence[int], settings: NnUNetAugment, scale: float = 1.0) -> tuple[int, ...]:
    """The crop the loader should cut (centred where the training crop is centred) for `out_size`.

    The smallest size, of the same parity as `out_size` on each axis (so that its centre slice is exactly
    the training crop the loader would cut today), whose inside holds every trilinear tap of every output
    voxel for any rotation the settings allow and any sampling scale up to `scale`. Larger scales (zoom-outs:
    with nnU-Net's settings 11 % of the rows draw one) read zeros beyond the input, as they do in nnU-Net,
    whose initial patch does not cover its scale range either; pass `settings.scale_range[1]` to cover them.
    """
    out = np.array([int(s) for s in out_size])
    half = (out - 1) / 2.0
    reach = np.zeros(3)  # max over rotations of sum_b |R_ab| half_b
    if settings.rotation_p > 0 and settings.rotation_degrees > 0:
        steps = np.linspace(-1.0, 1.0, 13) * math.radians(settings.rotation_degrees)
        axes = [settings.inplane_axis] if settings.inplane_axis is not None else [0, 1, 2]
        grids = np.meshgrid(*[steps if a in axes else np.zeros(1) for a in range(3)], indexing="ij")
        for angles in zip(*(g.ravel() for g in grids)):
            reach = np.maximum(reach, np.abs(rotation_matrix(angles)) @ half)
    else:
        reach = half.copy()
    if settings.scale_p > 0:
        per_axis = np.full(3, float(scale))
        if settings.inplane_axis is not None:
            per_axis[settings.inplane_axis] = 1.0
        reach = reach * np.maximum(per_axis, 1.0)
    need = 2 * reach + 1  # source positions c +- reach must lie in [0, size - 1]
    extra = np.maximum(np.ceil((need - out) / 2.0 - 1e-9), 0).astype(int)
    return tuple(int(o + 2 * e) for o, e in zip(out, extra))


def augment_batch(image: torch.Tensor, label: torch.Tensor, keys: Sequence[Sequence[int]], settings: NnUNetAugment,
                  out_size: Sequence[int], label_fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """nnU-Net's augmentation of a batch of crops, on their device; returns new tensors.

    image: float (B, 1, *in_size); label: integer (B, 1, *in_size), in_size >= out_size per axis (see
    `input_size`); keys: one sequence of non-negative ints per row. label_fill: the label
    of output voxels whose source lies (mostly) outside the input, e.g. an ignore index for partial labels.
    Returns image (B, 1, *out_size) of image's dtype and label (B, 1, *out_size) of label's dtype.
    """
    out_size = tuple(int(s) for s in out_size)
    _check_inputs(image, label, keys, out_size)
    params = draw_params(keys, settings)
    images, labels = _spatial(image, label, params, settings, out_size, label_fill)
    # one copy of every row into the batch (a per-row op costs a wait for every thread on a busy CPU)
    image, label = torch.stack(images), torch.stack(labels)
    return apply_intensity(image, params, settings.blur_sigma_range[1], settings.gamma_retain_stats), label


def _check_inputs(image: torch.Tensor, label: torch.Tensor, keys: Sequence[Sequence[int]], out_size: tuple[int, ...]
                  ) -> None:
    if image.ndim != 5 or image.shape[1] != 1 or not image.is_floating_point():
        raise ValueError(f"image must be float (B, 1, X, Y, Z), got {tuple(image.shape)} {image.dtype}")
    if label.shape != image.shape or label.is_floating_point() or label.dtype == torch.bool:
        raise ValueError(f"label must be integer and shaped like the image {tuple(image.shape)}, "
                         f"got {tuple(label.shape)} {label.dtype}")
    if label.device != image.device:
        raise ValueError(f"image on {image.device} and label on {label.device}")
    if len(keys) != image.shape[0]:
        raise ValueError(f"{len(keys)} keys for {image.shape[0]} rows")
    if len(out_size) != 3 or min(out_size) < 2 or any(o > i for o, i in zip(out_size, image.shape[2:])):
        raise ValueError(f"out_size {out_size} must be 3 sizes >= 2 and <= the input's {tuple(image.shape[2:])}")


def _spatial(image: torch.Tensor, label: torch.Tensor, params: RowParams, settings: NnUNetAugment,
             out_size: tuple[int, ...], label_fill: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rotation, scaling and mirroring: one grid_sample for the rows that rotate or scale, exact (flipped)
    centre slices for the others. Returns each row's image and label, (1, *out_size)."""
    in_size = tuple(image.shape[2:])
    start = [(i - o) // 2 for i, o in zip(in_size, out_size)]
    images: list = [None] * image.shape[0]  # every row gets its tensor below
    labels: list = [None] * label.shape[0]
    warped = np.flatnonzero(params.spatial)
    for row in np.flatnonzero(~params.spatial):
        window = (row, slice(None), *(slice(s, s + o) for s, o in zip(start, out_size)))
        dims = [1 + a for a in range(3) if params.flip[row, a]]  # the row's tensor is (1, X, Y, Z)
        images[row] = image[window].flip(dims) if dims else image[window]  # a view until the caller stacks
        labels[row] = label[window].flip(dims) if dims else label[window]
    if warped.size == 0:
        return images, labels

    # Output voxel p (its index offset from the output's centre) samples the input at index position
    # centre + A p, A = R diag(scale) with column a negated when axis a is mirrored (the flip, folded in).
    # grid_sample wants it normalised (align_corners=True: -1 and 1 are the centres of the end voxels) and
    # its grid lists the axes in reverse: grid[..., 0] indexes the last axis (Z, grid_sample's W),
    # grid[..., 2] the first (X, its D). This is the grid F.affine_grid would build, as a broadcast sum
    # over the output axes into (n, 3, X, Y, Z) and passed as a (n, X, Y, Z, 3) view: on the CPU several
    # times cheaper than affine_grid (a matmul over every voxel, writing 3-float rows), and each coordinate
    # stays contiguous for the label and border work below.
    n, device = len(warped), image.device
    out_half = np.array([(o - 1) / 2.0 for o in out_size])
    in_half = np.array([(i - 1) / 2.0 for i in in_size])
    centre = np.array(start) + out_half  # the centre slice's centre, in input voxels
    theta = np.zeros((n, 4, 3))  # per row: A's columns (normalised, grid order), then the translation
    reach = np.zeros((n, 3))  # per row: how far from the centre the samples reach along each input axis
    for k, row in enumerate(warped):
        matrix = rotation_matrix(params.angles[row]) @ np.diag(params.scale[row])
        matrix = matrix * np.where(params.flip[row], -1.0, 1.0)[None, :]
        reach[k] = np.abs(matrix) @ out_half
        theta[k, :3] = (matrix / in_half[:, None]).T[:, ::-1]
        theta[k, 3] = (centre / in_half - 1.0)[::-1]
    theta = torch.tensor(theta, dtype=torch.float32, device=device).view(n, 4, 3, 1, 1, 1)
    steps = [torch.arange(o, dtype=torch.float32, device=device) - h for o, h in zip(out_size, out_half)]
    planes = theta[:, 3] + theta[:, 0] * steps[0].view(-1, 1, 1)
    planes = (planes + theta[:, 1] * steps[1].view(1, -1, 1)) + theta[:, 2] * steps[2].view(1, 1, -1)
    grid = planes.permute(0, 2, 3, 4, 1)
    rows = torch.as_tensor(warped, device=device)
    source = image if n == image.shape[0] else image.index_select(0, rows)
    sampled = F.grid_sample(source.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    sampled = sampled.to(image.dtype)
    # pos[i]: (n, *out_size), the source position in voxels along input axis i, as grid_sample computes it
    pos = [planes[:, 2 - i].add(1.0).mul_(float(in_half[i])) for i in range(3)]

    # A voxel whose trilinear weight lies more than half outside the input gets label_fill, in both label
    # modes: the label never invents a class where the image shows padding. Where the weight inside is
    # >= 1/2, every axis's is, so the nearest voxel lies inside. Skipped when every row's samples stay
    # inside (at the input_size the loader cuts, all but the zoom-outs).
    outside = None
    if ((centre - reach < 0) | (centre + reach > 2 * in_half)).any():
        inside = None
        for i in range(3):
            weight = torch.minimum(pos[i] + 1.0, in_size[i] - pos[i]).clamp_(0.0, 1.0)
            inside = weight if inside is None else inside.mul_(weight)
        outside = (inside < 0.5)[:, None]
    if settings.label_mode == "nearest":
        # one gather by flat index (any integer dtype, no float copy of the label); torch.round rounds half
        # to even, as grid_sample's nearest mode does. The index is summed in float32, exact below 2**24.
        label = label.contiguous()
        exact = math.prod(in_size) < 2**24
        idx = [pos[i].round_().clamp_(0, in_size[i] - 1) for i in range(3)]
        idx = idx if exact else [i.long() for i in idx]
        flat = idx[0].mul_(in_size[1]).add_(idx[1]).mul_(in_size[2]).add_(idx[2])
        flat = flat.long() if exact else flat
        flat += rows.view(n, 1, 1, 1) * math.prod(in_size)
        lab = label.view(-1).take(flat)[:, None]
    else:
        # nnU-Net's: each class's one-hot map sampled linearly, the largest wins (ties: the lower class);
        # one class at a time keeps the memory at one float copy of the input rows
        source = label.index_select(0, rows)
        best = lab = None
        for value in torch.unique(source).tolist():
            vote = F.grid_sample((source == value).float(), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=True)
            if best is None:
                best, lab = vote, torch.full_like(source[:, :, :1, :1, :1], value).expand(vote.shape).clone()
            else:
                better = vote > best
                best = torch.maximum(best, vote)
                lab = lab.masked_fill_(better, value)
    lab = lab if outside is None else lab.masked_fill(outside, label_fill)
    for k, row in enumerate(warped):
        images[row], labels[row] = sampled[k], lab[k]
    return images, labels
