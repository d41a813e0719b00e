"""Random ROI crops and augmentation for training (a `torch.utils.data.Dataset`).

Each item is `num_samples` crops from one volume. A crop is centred on a labelled voxel (positive) with
probability `pos_fraction`, otherwise on an unlabelled foreground voxel (image > 0, label == 0; negative),
like the reference's RandCropByPosNegLabel(pos=1, neg=1, image_threshold=0); when one kind has no voxel
the other is used, and the centre is shifted so that the crop stays inside the volume. A positive
centre is drawn uniformly over all labelled voxels (`positive_centres="voxel"`, the reference's), or
`"class"` (the default, as in training): first a class uniformly among those present, then a voxel of it (nnU-Net's
foreground oversampling, MONAI's RandCropByLabelClasses with equal ratios). Uniform voxels put most
crops on the largest organ (the liver is half the labelled voxels of an abdominal CT), so small organs
are seldom seen; `"class"` shows each organ equally often.

Augmentation, applied per crop in this order:
- optional limited field of view (off by default): with probability `fov_prob` the crop keeps only a box
  around its centre, each axis `fov_min`..1 of its length, and the rest becomes image 0 and background,
  which is what a slab or a crop of a scan looks like once preprocessing pads it to the window
  (bench/ct_limits.py: a model trained on whole scans loses the spleen on a 40 mm slab of its own
  training CT);
- optional intensity remapping (off by default): with probability `remap_prob` the crop's intensities go
  through a random piecewise-linear curve on [0, 1] (`remap_intensity`), which may reorder the tissues'
  brightness: what a network learns from such crops is the organs' shape and place, which another sequence,
  another contrast phase or a patient whose organs are darker than the training patients' keeps
  (bench/mr_limits.py: a held-out MR patient's T2-dark liver and spleen);
- optional spatial warp (off by default; on when `rotate_degrees` or `scale_range` > 0), with probability
  `warp_prob` (default 1, the reference's RandAffine prob=1.0): rotation by U(-rotate_degrees,
  rotate_degrees) about the S/I axis (in the axial plane, as the reference's RandAffine
  rotate_range=(0, 0, pi/30)) and per-axis sampling scale 1 + U(-scale_range, scale_range) about the crop
  centre; linear for the image, nearest for the label, reflected borders;
- optional mirroring (off by default, as the reference): `flip=True` flips each axis with probability
  0.5, or give the axes, e.g. (0, 1, 2). The label is flipped with the image and keeps its classes, as in
  nnU-Net (see `mulmodseg.augment`: renaming left/right classes contradicts the anatomy around them);
- intensity scale v * (1 + U(-intensity_scale, intensity_scale)) with probability `aug_prob`, then
  intensity shift v + U(-intensity_shift, intensity_shift) with probability `aug_prob`.

Determinism: every item draws from `numpy.random.default_rng([seed, *draw, index])`, where the draw is the
epoch or any tuple of numbers given to `set_epoch` (the trainer's is (epoch, modality, pass, rank)), so the
crops depend only on (seed, draw, index): not on DataLoader workers, their number, or the iteration order,
and a resumed run replays them. Call `set_epoch` before iterating each epoch; with
`persistent_workers=True` the workers keep the draw they were created with, so do not combine the two.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .geometry import linear_taps
from .preprocess import ROI_SIZE

POSITIVE_CENTRES = ("voxel", "class")
# The intensity curve's levels at 0, 1/5, ..., 1: enough bends to reorder the few tissue classes of a crop.
REMAP_KNOTS = 6


class CropDataset(Dataset):
    """volumes: [(image float (X, Y, Z), label int (X, Y, Z))] in the training space (e.g. memmaps from
    `VolumeCache`), ideally padded to >= roi_size (smaller volumes are zero-padded per crop).

    cut_size (>= roi_size, the same parity on each axis; default roi_size): the size of the crops cut, for a
    later step that warps them down to roi_size (``mulmodseg.augment.augment_batch``). Each is the roi_size crop
    this dataset would cut, grown by the same margin on both sides, reading image 0 and background beyond the
    volume: its centre slice is exactly the roi_size crop, wherever the drawn centre lies.

    Item i: {"image": float32 (num_samples, 1, *cut_size), "label": int64 (num_samples, 1, *cut_size)},
    "modality": str when `modality` is given, "labelled": bool (num_samples, K) when `labelled` is given:
    one (K,) bool mask per volume of the classes its dataset labels (the loss of partially labelled data), and
    "key": int64 (num_samples, 2 + len(draw) + 1) when `keys`: each crop's (seed, *draw, index, sample), the
    numbers a later random step (``mulmodseg.augment``) draws that crop's randomness from.
    """

    def __init__(self, volumes: Sequence[tuple[np.ndarray, np.ndarray]], roi_size: Sequence[int] = ROI_SIZE,
                 num_samples: int = 2, pos_fraction: float = 0.5, intensity_shift: float = 0.1,
                 intensity_scale: float = 0.1, aug_prob: float = 0.5, rotate_degrees: float = 0.0,
                 scale_range: float = 0.0, warp_prob: float = 1.0, flip: bool | Sequence[int] = False, seed: int = 0,
                 modality: str | None = None, positive_centres: str = "class",
                 labelled: Sequence[np.ndarray] | None = None,
                 keys: bool = False, fov_prob: float = 0.0, fov_min: float = 0.2, remap_prob: float = 0.0,
                 cut_size: Sequence[int] | None = None):
        if any(label is None for _, label in volumes):
            raise ValueError("CropDataset needs a label for every volume")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        if positive_centres not in POSITIVE_CENTRES:
            raise ValueError(f"positive_centres must be one of {POSITIVE_CENTRES}, got {positive_centres!r}")
        if not 0.0 <= fov_prob <= 1.0 or not 0.0 < fov_min <= 1.0:
            raise ValueError(f"fov_prob must be in [0, 1] and fov_min in (0, 1], got {fov_prob} and {fov_min}")
        if not 0.0 <= remap_prob <= 1.0:
            raise ValueError(f"remap_prob must be in [0, 1], got {remap_prob}")
        self.positive_centres = positive_centres
        self.remap_prob = float(remap_prob)
        self.fov_prob, self.fov_min = float(fov_prob), float(fov_min)
        self.volumes = list(volumes)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.cut_size = self.roi_size if cut_size is None else tuple(int(c) for c in cut_size)
        if len(self.cut_size) != len(self.roi_size) or any(
                c < r or (c - r) % 2 for c, r in zip(self.cut_size, self.roi_size)):
            raise ValueError(f"cut_size {self.cut_size} must be >= roi_size {self.roi_size} by an even margin per axis")
        self.margin = tuple((c - r) // 2 for c, r in zip(self.cut_size, self.roi_size))  # per side, per axis
        self.num_samples = int(num_samples)
        self.pos_fraction = float(pos_fraction)
        self.intensity_shift = float(intensity_shift)
        self.intensity_scale = float(intensity_scale)
        self.aug_prob = float(aug_prob)
        self.rotate_degrees = float(rotate_degrees)
        self.scale_range = float(scale_range)
        self.warp_prob = float(warp_prob)
        self.flip_axes = (0, 1, 2) if flip is True else tuple(flip or ())
        self.seed = int(seed)
        self.modality = modality
        if labelled is not None and len(labelled) != len(self.volumes):
            raise ValueError(f"{len(labelled)} labelled masks for {len(self.volumes)} volumes")
        self.labelled = None if labelled is None else [np.asarray(m, dtype=bool) for m in labelled]
        self.keys = keys
        self.draw: tuple[int, ...] = (0,)

    def set_epoch(self, draw: int | Sequence[int]) -> None:
        """Select the draw whose crops `__getitem__` returns: an epoch, or a tuple of numbers such as the
        trainer's (epoch, modality, pass, rank)."""
        self.draw = (int(draw),) if isinstance(draw, (int, np.integer)) else tuple(int(d) for d in draw)

    def __len__(self) -> int:
        return len(self.volumes)

    def generator(self, index: int) -> np.random.Generator:
        """The random stream of item `index` in the current draw."""
        return np.random.default_rng([self.seed, *self.draw, int(index)])

    def draw_centres(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(centres (num_samples, 3) int, positive (num_samples,) bool) for volume `index`."""
        image, label = self.volumes[index]
        positive = rng.random(self.num_samples) < self.pos_fraction
        pools: dict[bool, np.ndarray] = {}
        centres = np.zeros((self.num_samples, 3), dtype=np.int64)
        for k, want_positive in enumerate(positive):
            pool = self._pool(pools, want_positive, image, label)
            if pool.size == 0:
                want_positive = not want_positive
                pool = self._pool(pools, want_positive, image, label)
            positive[k] = want_positive
            if want_positive and pool.size and self.positive_centres == "class":
                pool = self._class_pool(pools, label, rng)
            flat = rng.integers(pool.size) if pool.size else rng.integers(label.size)
            centres[k] = np.unravel_index(pool[flat] if pool.size else flat, label.shape)
        return centres, positive

    @staticmethod
    def _pool(pools: dict[object, np.ndarray], positive: bool, image: np.ndarray, label: np.ndarray) -> np.ndarray:
        if positive not in pools:
            mask = label > 0 if positive else (image > 0) & (label == 0)
            pools[positive] = np.flatnonzero(mask)
        return pools[positive]

    @staticmethod
    def _class_pool(pools: dict[object, np.ndarray], label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The labelled voxels of one class drawn uniformly among the classes present (flat indices)."""
        if "classes" not in pools:
            labelled = pools[True]
            values = np.asarray(label).reshape(-1)[labelled]
            pools["classes"] = np.unique(values)
            pools["values"] = values
        value = pools["classes"][rng.integers(pools["classes"].size)]
        return pools[True][pools["values"] == value]

    def __getitem__(self, index: int) -> dict[str, object]:
        rng = self.generator(index)
        image, label = self.volumes[index]
        centres, _ = self.draw_centres(index, rng)
        images, labels = [], []
        for centre in centres:
            img, lab = self._crop(image, centre), self._crop(label, centre)
            if self.fov_prob > 0 and rng.random() < self.fov_prob:  # no draw when off: runs before it replay
                # the box is drawn on the roi_size crop (the cut's centre), so a margin cut for a warp changes
                # neither the draws nor the view's size
                box = view_box(self.roi_size, self.fov_min, rng)
                img, lab = limit_view(img, lab, tuple(slice(b.start + m, b.stop + m) for b, m in zip(box, self.margin)))
            if self.remap_prob > 0 and rng.random() < self.remap_prob:  # no draw when off, as the view
                img = remap_intensity(img, rng.random(REMAP_KNOTS))
            img, lab = self._augment(np.asarray(img, dtype=np.float32), np.asarray(lab, dtype=np.int64), rng)
            images.append(img)
            labels.append(lab)
        item: dict[str, object] = {
            "image": torch.from_numpy(np.stack(images)[:, None]),
            "label": torch.from_numpy(np.stack(labels)[:, None]),
        }
        if self.modality is not None:
            item["modality"] = self.modality
        if self.labelled is not None:
            item["labelled"] = torch.from_numpy(np.repeat(self.labelled[index][None], self.num_samples, 0))
        if self.keys:
            item["key"] = torch.tensor([[self.seed, *self.draw, int(index), k] for k in range(self.num_samples)])
        return item

    def _crop(self, volume: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """The cut_size crop around the roi_size crop centred on `centre`: that crop is shifted to stay inside the
        volume (on an axis shorter than roi_size, the volume is centred in it); beyond the volume reads 0."""
        roi, shape = np.array(self.roi_size), np.array(volume.shape)
        start = np.where(shape < roi, -((roi - shape) // 2), np.clip(centre - roi // 2, 0, np.maximum(shape - roi, 0)))
        start = start - np.array(self.margin)
        stop = start + np.array(self.cut_size)
        low, high = np.maximum(start, 0), np.minimum(stop, shape)
        inside = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        if (low == start).all() and (high == stop).all():
            return np.array(volume[inside])
        crop = np.zeros(self.cut_size, dtype=volume.dtype)
        crop[tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(low, high, start))] = volume[inside]
        return crop

    def _augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if (self.rotate_degrees > 0 or self.scale_range > 0) and rng.random() < self.warp_prob:
            angle = np.deg2rad(rng.uniform(-self.rotate_degrees, self.rotate_degrees))
            scales = 1.0 + rng.uniform(-self.scale_range, self.scale_range, size=3)
            image, label = warp(image, label, angle, scales)
        for axis in self.flip_axes:
            if rng.random() < 0.5:
                image, label = np.flip(image, axis), np.flip(label, axis)
        if rng.random() < self.aug_prob:
            image = image * np.float32(1.0 + rng.uniform(-self.intensity_scale, self.intensity_scale))
        if rng.random() < self.aug_prob:
            image = image + np.float32(rng.uniform(-self.intensity_shift, self.intensity_shift))
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def view_box(shape: Sequence[int], min_fraction: float, rng: np.random.Generator) -> tuple[slice, ...]:
    """A random box of a crop of ``shape`` holding its centre voxel: per axis a length drawn uniformly from
    ceil(``min_fraction`` * n)..n, then a start among those that keep the centre inside."""
    box = []
    for n in shape:
        size = int(rng.integers(min(n, math.ceil(min_fraction * n)), n + 1))
        centre = n // 2
        start = int(rng.integers(max(0, centre - size + 1), min(centre, n - size) + 1))
        box.append(slice(start, start + size))
    return tuple(box)


def remap_intensity(image: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """image (X, Y, Z) of [0, 1] intensities through the piecewise-linear curve that takes ``len(levels)`` evenly
    spaced inputs 0..1 to ``levels`` (values outside [0, 1] take the end levels): float32, a new array."""
    knots = np.linspace(0.0, 1.0, len(levels))
    return np.interp(image, knots, levels).astype(np.float32)


def limit_view(image: np.ndarray, label: np.ndarray, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """image, label (X, Y, Z) kept inside ``box`` only: image 0 and label 0 (background) elsewhere, as the
    padding around a scan smaller than the window (new arrays)."""
    image_out, label_out = np.zeros_like(image), np.zeros_like(label)
    image_out[box], label_out[box] = image[box], label[box]
    return image_out, label_out


def warp(image: np.ndarray, label: np.ndarray, angle: float, scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by `angle` (radians) in the plane of axes 0 and 1 and scale the sampling positions by
    `scales` about the centre. image (X, Y, Z) linear, label (X, Y, Z) nearest; reflected borders.

    Equal to trilinear / nearest `grid_sample` (align_corners, reflection padding) over the 3D grid of
    source positions, computed in two cheap passes: the rotation is about axis 2, so a voxel's source
    position along axis 2 depends only on its own z, and in the plane only on its own (x, y).
    Linear weights and nearest indices factor per axis, so the image is interpolated along z, then
    bilinearly in the plane (four gathers of whole z-rows), and the label is one gather.
    """
    shape = image.shape
    centre = (np.array(shape) - 1) / 2.0
    z = _reflect((np.arange(shape[2]) - centre[2]) * scales[2] + centre[2], shape[2])
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin], [sin, cos]]) @ np.diag(np.asarray(scales[:2], dtype=np.float64))
    grid = np.stack(np.meshgrid(np.arange(shape[0]) - centre[0], np.arange(shape[1]) - centre[1], indexing="ij"), -1)
    plane = grid @ matrix.T + centre[:2]  # (X, Y, 2) source positions in the plane
    x, y = _reflect(plane[..., 0], shape[0]), _reflect(plane[..., 1], shape[1])

    near = [np.rint(c).astype(np.intp) for c in (x, y, z)]
    lab = label[near[0][:, :, None], near[1][:, :, None], near[2][None, None, :]]

    z0, z1, wz = linear_taps(z, shape[2])
    wz = wz.astype(np.float32)
    img = image[:, :, z0] * (1 - wz) + image[:, :, z1] * wz
    x0, x1, wx = linear_taps(x, shape[0])
    y0, y1, wy = linear_taps(y, shape[1])
    wx, wy = wx.astype(np.float32), wy.astype(np.float32)
    img = (img[x0, y0] * ((1 - wx) * (1 - wy))[..., None] + img[x1, y0] * (wx * (1 - wy))[..., None]
           + img[x0, y1] * ((1 - wx) * wy)[..., None] + img[x1, y1] * (wx * wy)[..., None])
    return img.astype(np.float32, copy=False), lab


def _reflect(coord: np.ndarray, size: int) -> np.ndarray:
    """Source coordinates folded into [0, size - 1] by reflection about the end voxels' centres."""
    if size == 1:
        return np.zeros_like(coord)
    span = size - 1
    c = np.abs(coord)
    extra = np.fmod(c, span)
    return np.clip(np.where(np.floor(c / span) % 2 == 0, extra, span - extra), 0, span)


def collate_crops(batch: list[dict[str, object]]) -> dict[str, object]:
    """Items of `CropDataset` -> {"image": (B * num_samples, 1, *roi), "label": same, int64}, "labelled" and
    "key" (B * num_samples, ...) when the items carry them and, when the items carry one, "modality": a list
    with one entry per row."""
    out: dict[str, object] = {
        "image": torch.cat([item["image"] for item in batch]),
        "label": torch.cat([item["label"] for item in batch]),
    }
    for key in ("labelled", "key"):
        if batch and all(key in item for item in batch):
            out[key] = torch.cat([item[key] for item in batch])
    if all("modality" in item for item in batch) and batch:
        out["modality"] = [item["modality"] for item in batch for _ in range(item["image"].shape[0])]
    return out


def labelled_mask(labelled: Sequence[int] | None, num_classes: int) -> np.ndarray:
    """(num_classes,) bool, one of `CropDataset`'s `labelled` masks: background and the foreground classes
    `labelled` (a case's ``Case.labelled``, the classes its dataset labels; None: every class)."""
    if labelled is None:
        return np.ones(num_classes, dtype=bool)
    mask = np.zeros(num_classes, dtype=bool)
    mask[[0, *labelled]] = True
    return mask
