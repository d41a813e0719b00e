"""Preprocessing into the training space and its exact inverse.

Order (per modality, settings from `default_settings`):
1. reorient to RAS (closest canonical; axis 0 = R/L, 1 = A/P, 2 = S/I). The reference resamples first and
   reorients after; reorienting first means the spacing applies to the anatomical axes, and a flip or
   transpose loses nothing, so the two orders agree up to which voxel the grid is anchored on;
2. resample to `spacing` (mm): linear for the image, nearest for the label. Output voxel j samples the
   RAS grid at (j + 0.5) * new / old - 0.5: the outer corner of voxel 0 is shared, the spacing is exact,
   the extent is round(n * old / new) voxels, and the last fraction of a voxel replicates the edge;
3. intensity: CT clip to `window` (HU) and scale to [0, 1]; MR (and any other modality) clip to the
   `percentiles` of the volume and min-max scale to [0, 1];
4. crop to the bounding box of the foreground, image > 0 after step 3 (for CT the air below the window
   becomes 0, so this is the body box, couch included), joined with the labelled voxels' box so that
   no annotation is ever cut off (the reference's CropForeground can drop labels at the box edge).
   An all-zero image keeps the whole volume;
5. pad symmetrically with zeros to at least `min_size` (the ROI), extra voxel after.

`restore` maps an array of the training space back onto the original voxel grid with the exact inverse
of each step: the original voxel i of a resampled axis sits at resampled coordinate
(i + 0.5) * old / new - 0.5 (then - crop start + pad), sampled nearest (labels) or linearly
(probabilities); voxels whose centre lies outside the crop box get `fill`. A nearest-neighbour round
trip of a label is exact wherever the training grid is finer than the original.

Settings that would destroy the data are refused (`settings_problems`: a voxel size that is not a positive
finite number, a window or percentiles whose low end is not below the high end), and so is a scan they would
destroy: resampled to a single voxel along an axis (`grid_problems`, from the header alone: voxel sizes in metres,
say), or a labelled class left without a voxel. `check_cases` reports these before any work, with a scan that
step 3 would make constant (`intensity_problem`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from .cases import DataError
from .geometry import (
    affine_problem,
    from_ras,
    inverse_grid,
    onto_axes,
    ras_affine,
    ras_orientation,
    resample,
    separable_grid,
    to_ras,
)
from .labels import apply_label_map, parse_label_map

ImageLike = Union[str, Path, "nib.spatialimages.SpatialImage"]

META_VERSION = 1
SETTING_KEYS = ("spacing", "window", "percentiles", "label_map", "crop_foreground", "min_size")
# The method's settings (the paper's section 4), the one source of the package's defaults: training's
# (``config.TrainConfig``) and the crops' (``sampling.CropDataset``) read them from here.
SPACING = (1.5, 1.5, 2.0)  # mm
CT_WINDOW = (-125.0, 275.0)  # HU -> [0, 1]
MR_PERCENTILES = (0.5, 99.5)  # clipped, then min-max -> [0, 1]
ROI_SIZE = (96, 96, 96)  # training crops and inference windows


def default_settings(modality: str) -> dict[str, Any]:
    """Preprocessing defaults (the constants above): 1.5 x 1.5 x 2.0 mm; CT window [-125, 275] HU -> [0, 1];
    MR and other modalities: clip to the 0.5 / 99.5 percentiles, min-max -> [0, 1]; crop to the
    foreground; pad to 96^3. A fresh JSON-friendly dict each call."""
    settings: dict[str, Any] = {
        "spacing": list(SPACING),
        "window": None,
        "percentiles": list(MR_PERCENTILES),
        "label_map": None,
        "crop_foreground": True,
        "min_size": list(ROI_SIZE),
    }
    if modality.upper() == "CT":
        settings.update(window=list(CT_WINDOW), percentiles=None)
    return settings


def resolve_settings(modality: str, settings: dict[str, Any]) -> dict[str, Any]:
    """`default_settings(modality)` overridden by `settings`; unknown keys raise TypeError, values that would
    destroy the data (`settings_problems`) ValueError. A `window` that is not None takes precedence over
    `percentiles`."""
    unknown = set(settings) - set(SETTING_KEYS)
    if unknown:
        raise TypeError(f"unknown preprocessing settings {sorted(unknown)}; known: {list(SETTING_KEYS)}")
    resolved = default_settings(modality)
    resolved.update(settings)
    problems = settings_problems(resolved)
    if problems:
        raise ValueError("; ".join(problems))
    return resolved


def _numbers(values: Sequence[float]) -> str:
    return " ".join(f"{float(v):g}" for v in values)


def settings_problems(settings: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[str]:
    """Why preprocessing `settings` would destroy every scan (empty when they would not), each problem naming
    its setting as `names` spells it (train.py's flags) or by its key: a `spacing` that is not three positive
    finite voxel sizes (an axis of 1 voxel, or none), a `window` whose low end is not below its high end, or
    `percentiles` outside 0 <= low < high <= 100 (an image of zeros)."""
    names = names or {}
    problems = []
    spacing, window, percentiles = (settings.get(key) for key in ("spacing", "window", "percentiles"))
    if spacing is not None and not (len(spacing) == 3 and all(math.isfinite(v) and v > 0 for v in spacing)):
        problems.append(f"{names.get('spacing', 'spacing')} {_numbers(spacing)}: give three voxel sizes in mm, each "
                        "a positive finite number (e.g. 1.5 1.5 2)")
    if window is not None and not (len(window) == 2 and all(map(math.isfinite, window)) and window[0] < window[1]):
        problems.append(f"{names.get('window', 'window')} {_numbers(window)}: give the low end, then a higher high "
                        "end, both finite (e.g. -125 275): every voxel would get one value")
    if percentiles is not None and not (len(percentiles) == 2 and 0 <= percentiles[0] < percentiles[1] <= 100):
        problems.append(f"{names.get('percentiles', 'percentiles')} {_numbers(percentiles)}: give two percentiles "
                        "with 0 <= low < high <= 100 (e.g. 0.5 99.5)")
    return problems


def training_grid(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float] | None
                  ) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, np.ndarray, list[int]]:
    """Where a scan of `shape` (3D) and `affine` goes at `spacing` (mm; None: kept): its RAS orientation
    (`ras_orientation`), shape in RAS order, voxel sizes in RAS order, resampling step (new / old voxel size)
    and resampled shape (round(n * old / new), at least 1)."""
    ornt = ras_orientation(affine)
    ras_shape = tuple(int(shape[i]) for i in np.argsort(ornt[:, 0]))
    affine_ras = ras_affine(affine, shape, ornt)
    old_spacing = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))
    step = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64) / old_spacing
    resampled = [max(1, int(np.floor(n / s + 0.5))) for n, s in zip(ras_shape, step)]
    return ornt, ras_shape, old_spacing, step, resampled


def grid_problems(name: str, shape: Sequence[int], affine: np.ndarray, settings: Mapping[str, Any]
                  ) -> tuple[list[str], list[str]]:
    """(problems, warnings) of resampling the scan `name` of `shape` and `affine` (its header: nothing is read)
    to `settings["spacing"]`. A problem: an axis of several voxels resampled to a single one (the scan would be
    a plane; a header in metres or centimetres, say). A warning: an axis at least `min_size` long resampled to
    fewer voxels than that (the crop), which is what too small voxel sizes in a header do."""
    if settings.get("spacing") is None:
        return [], []
    _, ras_shape, old_spacing, _, resampled = training_grid(shape, affine, settings["spacing"])
    grid = (f"its voxels of {_numbers(old_spacing)} mm (RAS) make a grid of {' x '.join(map(str, resampled))} "
            f"voxels from {' x '.join(map(str, ras_shape))} at the training spacing {_numbers(settings['spacing'])} mm")
    if any(n > 1 and r == 1 for n, r in zip(ras_shape, resampled)):
        return [f"{name}: {grid}: the scan would collapse to a single voxel along an axis; check the voxel sizes in "
                "its header (written in metres or cm instead of mm?)"], []
    crop = settings.get("min_size") or [0, 0, 0]
    if any(n >= c > r for n, r, c in zip(ras_shape, resampled, crop)):
        return [], [f"{name}: {grid}, smaller than the {' x '.join(map(str, crop))} crop: check the voxel sizes in "
                    "its header"]
    return [], []


def intensity_problem(name: str, low: float, high: float, settings: Mapping[str, Any],
                      clip: Sequence[float] | None = None) -> str | None:
    """Why the scan `name`, whose values run from `low` to `high`, would hold one value everywhere after
    `normalise_intensity` with `settings` (None when it would not): a (nearly) constant scan, values all outside
    the window, or a percentile range `clip` (low, high of the scan's percentiles) of zero width."""
    if not high - low > 1e-6 * max(abs(low), abs(high)):
        return f"{name}: every voxel has the value {low:g} (or nearly): a blank or constant scan, nothing to segment"
    window, percentiles = settings.get("window"), settings.get("percentiles")
    if window is not None and (high <= window[0] or low >= window[1]):
        return (f"{name}: its values {low:g}..{high:g} lie outside the intensity window {_numbers(window)}, so every "
                "voxel would get one value; is it of another modality, or stored without its scaling?")
    if window is None and percentiles is not None and clip is not None and not clip[1] > clip[0]:
        return (f"{name}: its {percentiles[0]:g}th and {percentiles[1]:g}th percentiles are both {clip[0]:g} (most "
                "voxels hold one value), so every voxel would get one value")
    return None


def load_volume(path: str | Path) -> nib.Nifti1Image:
    """nib.load(path) with trailing axes of length 1 dropped: an (X, Y, Z, 1) file is the 3D volume
    (X, Y, Z) with the same affine, as ITK and 3D Slicer read it. Other shapes are returned as stored."""
    img = nib.load(str(path))
    extra = tuple(img.shape[3:])
    if extra and all(n == 1 for n in extra):
        # A reshaped proxy, not img.slicer: that reads the whole scan at once, scaled to float64.
        return type(img)(img.dataobj.reshape(img.shape[:3]), img.affine, img.header)
    return img


def _load(image: ImageLike):
    if not isinstance(image, (str, Path)):
        return image
    try:
        return load_volume(image)
    except Exception as e:  # nibabel raises many types for a missing file or a bad header
        raise DataError(f"{image}: unreadable ({type(e).__name__}: {e})") from e


def _name(image: ImageLike, loaded) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return loaded.get_filename() or "<in-memory image>"


def read_label(label: nib.Nifti1Image, name: str, image: nib.Nifti1Image, label_map) -> np.ndarray:
    """A label image's voxels as class ids on the voxel grid of `image`: uint8 (X, Y, Z) in the image
    file's axis order, after `label_map` (as `parse_label_map` takes) when given. A label stored in
    another axis order or direction is flipped/transposed onto the image's axes by its own affine
    (`geometry.onto_axes`); otherwise voxel i of the label belongs to voxel i of the image. Raises
    DataError naming `name` for a shape other than the image's, non-integer values, or values outside
    0..255 without a map."""
    data = np.asanyarray(label.dataobj)
    if affine_problem(label.affine) is None:  # an unusable label affine leaves voxel correspondence
        data, _ = onto_axes(data, label.affine, image.affine)
    if data.shape != tuple(image.shape):
        raise DataError(f"{name}: label shape {data.shape} differs from image shape {tuple(image.shape)}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DataError(f"{name}: label values are not integers")
        data = data.astype(np.int64)
    if label_map is not None:
        try:
            return apply_label_map(data, parse_label_map(label_map))
        except ValueError as e:
            raise DataError(f"{name}: {e}") from e
    if data.min() < 0 or data.max() > 255:
        raise DataError(f"{name}: label values outside 0..255 ({data.min()}..{data.max()}); give a label_map")
    return data.astype(np.uint8)


def normalise_intensity(image: np.ndarray, window=None, percentiles=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Clip to `window` (absolute values) or to the `percentiles` of `image`, then scale to [0, 1].
    With neither, the image passes unchanged. Returns (float32 image, {"clip": [low, high], ...})."""
    if window is None and percentiles is None:
        return image.astype(np.float32, copy=False), {"clip": None}
    if window is not None:
        low, high = float(window[0]), float(window[1])
    else:
        low, high = (float(v) for v in np.percentile(image, [float(percentiles[0]), float(percentiles[1])]))
    out = np.clip(image, low, high).astype(np.float32, copy=False)
    out -= np.float32(low)
    if high > low:
        out /= np.float32(high - low)
        np.clip(out, 0.0, 1.0, out=out)  # float32 rounding can overshoot 1 by an ulp
    else:
        out[...] = 0.0
    return out, {"clip": [low, high], "window": window is not None}


def foreground_box(*masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of the smallest box holding every True voxel of the masks (whole grid if none)."""
    shape = np.array(masks[0].shape)
    start, end = shape.copy(), np.zeros(3, dtype=int)
    for mask in masks:
        for axis in range(3):
            hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            if hits.size:
                start[axis] = min(start[axis], hits[0])
                end[axis] = max(end[axis], hits[-1] + 1)
    if np.any(end <= start):
        return np.zeros(3, dtype=int), shape
    return start, end


def preprocess(image: ImageLike, label: ImageLike | None = None, modality: str = "CT",
               **settings: Any) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """NIfTI (path or nibabel image) -> training space.

    Returns image: float32 (X, Y, Z) in RAS array order, label: uint8 (X, Y, Z) of class indices (None
    without a label), meta: JSON-serialisable dict for `restore` (also "affine": the training-space
    affine, "spacing", "intensity"). Settings: see `default_settings`; label_map as `parse_label_map`.
    Raises DataError (naming the file) for unreadable files, non-3D images, an affine that places no
    voxel, shape mismatch or bad label values.
    """
    cfg = resolve_settings(modality, settings)
    img = _load(image)
    name = _name(image, img)
    if len(img.shape) != 3:
        raise DataError(f"{name}: expected a 3D volume, got shape {tuple(img.shape)}")
    problem = affine_problem(img.affine)
    if problem:
        raise DataError(f"{name}: {problem}")
    problems, _ = grid_problems(name, img.shape, img.affine, cfg)
    if problems:
        raise DataError(problems)
    original_shape = tuple(int(n) for n in img.shape)
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as e:  # truncated gzip -> EOFError, zlib.error, OSError, ValueError
        raise DataError(f"{name}: unreadable or truncated data ({type(e).__name__}: {e})") from e
    lab = label_name = None
    if label is not None:
        label_img = _load(label)
        label_name = _name(label, label_img)
        lab = read_label(label_img, label_name, img, cfg["label_map"])

    ornt, ras_shape, old_spacing, step, resampled_shape = training_grid(original_shape, img.affine, cfg["spacing"])
    affine_ras = ras_affine(img.affine, original_shape, ornt)
    grid = separable_grid(resampled_shape, step, ras_shape)
    data = np.ascontiguousarray(resample(to_ras(data, ornt), grid, order=1))
    if lab is not None:
        classes = np.flatnonzero(np.bincount(lab.ravel(), minlength=256))
        lab = np.ascontiguousarray(resample(to_ras(lab, ornt), grid, order=0))
        lost = sorted(set(classes.tolist()) - set(np.flatnonzero(np.bincount(lab.ravel())).tolist()))
        if lost:
            grids = f"{' x '.join(map(str, ras_shape))} -> {' x '.join(map(str, resampled_shape))}"
            raise DataError(f"{label_name}: class(es) {lost} have no voxel left on the training grid (voxels of "
                            f"{_numbers(old_spacing)} mm resampled to {_numbers(cfg['spacing'])} mm, {grids}): use a "
                            "finer --spacing, or check the voxel sizes in the header of the image")

    data, intensity = normalise_intensity(data, cfg["window"], cfg["percentiles"])

    if cfg["crop_foreground"]:
        masks = [data > 0] + ([] if lab is None else [lab > 0])
        start, end = foreground_box(*masks)
    else:
        start, end = np.zeros(3, dtype=int), np.array(resampled_shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(start, end))
    cropped = np.array(end) - np.array(start)
    min_size = np.zeros(3, dtype=int) if cfg["min_size"] is None else np.asarray(cfg["min_size"], dtype=int)
    pad_total = np.maximum(min_size - cropped, 0)
    pad_before, pad_after = pad_total // 2, pad_total - pad_total // 2
    padding = list(zip(pad_before.tolist(), pad_after.tolist()))
    data = np.pad(data[crop], padding)
    lab = None if lab is None else np.pad(lab[crop], padding)

    # training index t -> resampled index t - pad + crop_start -> RAS index (... + 0.5) * step - 0.5
    to_ras_index = np.diag(list(step) + [1.0])
    to_ras_index[:3, 3] = (np.array(start) - pad_before + 0.5) * step - 0.5
    meta = {
        "version": META_VERSION,
        "modality": modality,
        "original_shape": list(original_shape),
        "original_affine": np.asarray(img.affine, dtype=np.float64).tolist(),
        "ornt": ornt.tolist(),
        "ras_shape": [int(n) for n in ras_shape],
        "step": [float(s) for s in step],
        "resampled_shape": resampled_shape,
        "crop_start": [int(v) for v in start],
        "crop_end": [int(v) for v in end],
        "pad_before": pad_before.tolist(),
        "pad_after": pad_after.tolist(),
        "shape": [int(n) for n in data.shape],
        "affine": (affine_ras @ to_ras_index).tolist(),
        "spacing": (old_spacing * step).tolist(),
        "intensity": intensity,
        "label_map": None if cfg["label_map"] is None else sorted(map(list, parse_label_map(cfg["label_map"]).items())),
    }
    return data, lab, meta


def restore_grid(meta: dict[str, Any]) -> tuple[list, list]:
    """Where each original voxel lies in the training space: per RAS axis, the training-space coordinate
    of every original voxel (clipped into the crop) and whether its centre lies inside the crop box."""
    positions, valid = [], []
    for axis, q in enumerate(inverse_grid(meta["ras_shape"], meta["step"])):
        q = np.clip(q, 0, meta["resampled_shape"][axis] - 1)
        start, end = meta["crop_start"][axis], meta["crop_end"][axis]
        valid.append((q >= start - 0.5) & (q <= end - 0.5))  # centre inside the crop's voxel boxes
        positions.append(np.clip(q, start, end - 1) - start + meta["pad_before"][axis])
    return positions, valid


def _check_shape(array: np.ndarray, meta: dict[str, Any], leads: tuple[int, ...]) -> int:
    lead = array.ndim - 3
    if lead not in leads or list(array.shape[lead:]) != list(meta["shape"]):
        expected = " or ".join(str(("C",) * n + tuple(meta["shape"])) for n in leads)
        raise ValueError(f"expected shape {expected}, got {array.shape}")
    return lead


def restore(array: np.ndarray, meta: dict[str, Any], interpolation: str = "nearest",
            fill: float = 0) -> np.ndarray:
    """Training-space array (X, Y, Z) or (C, X, Y, Z) -> the original voxel grid, shape
    (*C, *meta["original_shape"]), to be written with the original affine/header.

    interpolation: "nearest" (labels; dtype kept) or "linear" (probabilities/logits; float).
    Voxels outside the foreground crop get `fill` (0: background for labels and probabilities).
    """
    if interpolation not in ("nearest", "linear"):
        raise ValueError(f"interpolation must be 'nearest' or 'linear', got {interpolation!r}")
    array = np.asarray(array)
    lead = _check_shape(array, meta, (0, 1))
    positions, valid = restore_grid(meta)
    out = resample(array, positions, order=0 if interpolation == "nearest" else 1, lead=lead)
    inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    if not inside.all():
        out = np.where(inside, out, np.asarray(fill, dtype=out.dtype))
    return np.ascontiguousarray(from_ras(out, np.asarray(meta["ornt"], dtype=int), lead=lead))


def restore_probabilities(probs: np.ndarray, meta: dict, dtype: type = np.float16) -> np.ndarray:
    """Softmax (K, X, Y, Z) on the training grid -> (K, *original shape) of ``dtype`` on the scan's grid,
    linearly, channel by channel (one float32 copy of a channel at a time); outside the foreground crop
    background, probability 1 for class 0 and 0 for the others."""
    restored = np.empty((len(probs), *meta["original_shape"]), dtype=dtype)
    for k, channel in enumerate(probs):
        restored[k] = restore(channel, meta, "linear", fill=1.0 if k == 0 else 0.0)
    return restored


def restore_argmax(scores: np.ndarray, meta: dict[str, Any], planes: int = 16) -> np.ndarray:
    """Class scores (C, X, Y, Z) of the training space (probabilities or logits) -> uint8 labels on the
    original grid: every channel restored linearly (as ``restore(..., "linear")``) and the argmax taken
    there, as nnU-Net exports; voxels outside the crop box are background (class 0).

    The original grid is done ``planes`` RAS planes at a time (per channel, the argmax kept as it goes),
    so beyond the labels it holds two score slabs, not C original-size arrays: a 512 x 512 x 600 CT
    needs about the memory of its uint8 label map twice. Resampling the scores, not the training-space
    labels, keeps small structures: a label resampled by nearest neighbour is blocky at the training
    spacing (tests/test_preprocess.py, a sphere on a 0.75 x 0.75 x 3 mm grid).
    """
    scores = np.asarray(scores)
    _check_shape(scores, meta, (1,))
    positions, valid = restore_grid(meta)
    labels = np.zeros([len(p) for p in positions], dtype=np.uint8)
    inside_yz = valid[1][:, None] & valid[2][None, :]
    for start in range(0, labels.shape[0], planes):
        rows = slice(start, start + planes)
        # The training-space planes that this slab reads, so each channel resamples only those.
        first = int(np.floor(positions[0][rows].min()))
        last = min(int(np.floor(positions[0][rows].max())) + 2, scores.shape[1])
        part = [positions[0][rows] - first, positions[1], positions[2]]
        best = None
        for channel in range(scores.shape[0]):
            score = resample(scores[channel, first:last], part, order=1)
            if best is None:
                best = score
                continue
            better = score > best
            labels[rows][better] = channel
            np.maximum(best, score, out=best)
        inside = valid[0][rows, None, None] & inside_yz[None]
        labels[rows][~inside] = 0
    return np.ascontiguousarray(from_ras(labels, np.asarray(meta["ornt"], dtype=int)))
