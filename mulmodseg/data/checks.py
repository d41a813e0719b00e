"""Dataset integrity check before training (in the spirit of nnU-Net's dataset check).

Every file is opened once; all problems of all cases are gathered and raised together as one DataError,
each message naming its file. Affine drift between image and label is only a warning (the image's
affine is used for both).
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .cases import Case, DataError
from .geometry import affine_problem, onto_axes
from .labels import LabelMapSpec, label_map_problems, parse_label_map
from .preprocess import load_volume


def _read(path: Path, what: str, problems: List[str], scaled: bool = True):
    """(nibabel image, data) or (None, None) after recording why not. Without `scaled`, the data are the
    stored values before the header's slope and intercept: a CT's int16 voxels stay 2 bytes each, not
    the 8 of the float64 that scaling makes, and they are finite whenever the stored values are."""
    if not path.is_file():
        problems.append(f"{path}: missing {what} file")
        return None, None
    try:
        img = load_volume(path)
    except Exception as e:  # nibabel raises many types for a bad header
        problems.append(f"{path}: unreadable or truncated {what} ({type(e).__name__}: {e})")
        return None, None
    shape = tuple(img.shape)
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1):
        problems.append(f"{path}: {what} is 2D (shape {shape}); a 3D volume is required")
        return None, None
    if len(shape) > 3:
        problems.append(f"{path}: {what} is {len(shape)}D (shape {shape}); a 3D volume is required")
        return None, None
    try:
        proxy = img.dataobj
        data = np.asanyarray(proxy) if scaled or not hasattr(proxy, "get_unscaled") else proxy.get_unscaled()
    except Exception as e:  # truncated gzip -> EOFError, zlib.error, OSError, ValueError
        problems.append(f"{path}: unreadable or truncated {what} data ({type(e).__name__}: {e})")
        return None, None
    if data.dtype.kind not in "biuf":  # RGB (a structured dtype) or complex voxels
        problems.append(f"{path}: {what} voxels are of type {data.dtype}; one real number per voxel is required")
        return None, None
    return img, data


def _values_text(values: Sequence[int]) -> str:
    """A list of label values for a message, shortened when long (an image given as a label has thousands)."""
    if len(values) <= 8:
        return str(list(values))
    return f"{len(values)} values from {min(values)} to {max(values)} ({', '.join(map(str, values[:4]))}, ...)"


def _value_range(img, data: np.ndarray) -> Tuple[float, float]:
    """(lowest, highest) voxel value after the header's scaling, in float64, from `data` as `_read`
    returns it for an image (the stored values: only the two extremes are scaled)."""
    low, high = float(np.min(data)), float(np.max(data))
    if hasattr(img.dataobj, "get_unscaled"):
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        low, high = sorted((low * slope + inter, high * slope + inter))
    return low, high


def _modality_warning(case: Case, low: float) -> Optional[str]:
    """A warning when a CT has no air (nothing below -500 HU) or an MR has CT-like air values: the
    usual sign of swapped --ct_dir / --mr_dir, or of a wrong --modality at inference."""
    if case.modality == "CT" and low > -500:
        return (f"{case.image}: given as CT, but its lowest value is {low:g}, where a CT in HU has air near -1000; "
                "is it an MR (swapped --ct_dir/--mr_dir, or the wrong --modality)?")
    if case.modality == "MR" and low < -500:
        return (f"{case.image}: given as MR, but it has values down to {low:g}, like the air of a CT in HU; "
                "is it a CT (swapped --ct_dir/--mr_dir, or the wrong --modality)?")
    return None


def _label_values(data: np.ndarray) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer) and data.size and data.min() >= 0 and data.max() < 65536:
        return np.flatnonzero(np.bincount(data.ravel()))
    return np.unique(data)


def _check_case(case: Case, mapping: Optional[Mapping[int, int]], num_classes: Optional[int],
                affine_tol: float) -> Tuple[List[str], List[str]]:
    problems: List[str] = []
    warnings: List[str] = []
    img, data = _read(Path(case.image), "image", problems, scaled=False)
    unusable = None if img is None else affine_problem(img.affine)
    if unusable:
        problems.append(f"{case.image}: {unusable}")
        img = None
    if data is not None and np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(f"{case.image}: {bad} NaN/Inf voxels in the image")
    if data is not None and data.size and not problems:
        low, high = _value_range(img, data)
        # Preprocessing reads float32: a scaling that overflows it would turn the scan into NaN.
        if not max(abs(low), abs(high)) <= float(np.finfo(np.float32).max):
            problems.append(f"{case.image}: values reach {low:g}..{high:g} after the header's scaling "
                            "(scl_slope, scl_inter), beyond float32")
        else:
            warning = _modality_warning(case, low)
            if warning:
                warnings.append(warning)
    if case.label is not None:
        _check_label(Path(case.label), "label", img, case.image, "image", mapping, num_classes, affine_tol, problems,
                     warnings)
    return problems, warnings


def _check_label(path: Path, what: str, reference, reference_path, reference_what: str,
                 mapping: Optional[Mapping[int, int]], num_classes: Optional[int], affine_tol: float,
                 problems: List[str], warnings: List[str]):
    """Check the label map at `path` (called `what` in messages) on the grid of the nibabel image
    `reference` (None: no grid to compare, e.g. it was unreadable) read from `reference_path`, adding to
    `problems` and `warnings`. Returns the label's nibabel image, or None when it cannot be read."""
    lab, values = _read(path, what, problems)
    if values is None:
        return None
    if reference is not None:
        unusable = affine_problem(lab.affine)
        if unusable:
            warnings.append(f"{path}: {unusable}; its voxels are taken to be the {reference_what}'s ({reference_path})")
        else:
            # As read_label does: a label stored in another axis order goes onto the image's axes first.
            values, lab_affine = onto_axes(values, lab.affine, reference.affine)
            drift = float(np.abs(lab_affine - np.asarray(reference.affine)).max())
            if not drift <= affine_tol:
                warnings.append(f"{path}: affine differs from the {reference_what}'s by up to {drift:.4g} "
                                f"(> {affine_tol}); the {reference_what} affine ({reference_path}) is used")
        if values.shape != tuple(reference.shape):
            problems.append(f"{path}: {what} shape {values.shape} differs from {reference_what} shape "
                            f"{tuple(reference.shape)} ({reference_path})")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)):
            problems.append(f"{path}: NaN/Inf voxels in the {what}")
            return lab
        if not np.array_equal(values, np.round(values)):
            problems.append(f"{path}: {what} values are not integers")
            return lab
    present = [int(v) for v in _label_values(values)]
    # Hundreds of distinct values: an image where a label map should be (swapped folders, --labels).
    hint = f"; {len(present)} distinct values: is it an image rather than a label map?" if len(present) > 255 else ""
    if mapping is not None:
        unmapped = label_map_problems(present, mapping)
        if unmapped:
            problems.append(f"{path}: {what} values {_values_text(unmapped)} are not in the label map{hint}")
            return lab
        classes = sorted({mapping.get(v, 0) for v in present})
    else:
        classes = present
        out_of_range = [v for v in present if v < 0 or v > 255]
        if out_of_range:
            problems.append(f"{path}: {what} values {_values_text(out_of_range)} outside 0..255; "
                            f"give a label map{hint}")
            return lab
    if num_classes is not None:
        too_big = [v for v in classes if v >= num_classes]
        if too_big:
            problems.append(f"{path}: class values {_values_text(too_big)} >= num_classes={num_classes}{hint}")
    return lab


def check_label_pairs(pairs: Sequence[Tuple[Path, Path]], label_map: Optional[LabelMapSpec] = None,
                      num_classes: Optional[int] = None, affine_tol: float = 1e-3,
                      num_workers: Optional[int] = None) -> List[str]:
    """Check (prediction, reference label) pairs of label-map files before scoring, each file read once:
    both readable 3D label maps whose values are known (as labels are in `check_cases`), and the
    prediction on the label's grid: the same shape once put on the label's axes, and affines within
    `affine_tol` (beyond it only a warning, as between an image and its label: the voxels are taken to
    correspond). Returns the warnings; raises one DataError listing every problem of every pair."""
    if not pairs:
        raise DataError("no pairs to check")
    mapping = None if label_map is None else parse_label_map(label_map)

    def check(pair):
        pred, label = (Path(p) for p in pair)
        problems: List[str] = []
        warnings: List[str] = []
        reference = _check_label(label, "label", None, None, "label", mapping, num_classes, affine_tol, problems,
                                 warnings)
        unusable = None if reference is None else affine_problem(reference.affine)
        if unusable:
            problems.append(f"{label}: {unusable}")
            reference = None
        _check_label(pred, "prediction", reference, label, "label", mapping, num_classes, affine_tol, problems,
                     warnings)
        return problems, warnings

    with ThreadPoolExecutor(max_workers=num_workers or min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check, pairs))
    problems = [p for found, _ in results for p in found]
    if problems:
        raise DataError(problems)
    return [w for _, found in results for w in found]


def check_cases(cases: Sequence[Case], label_map: Optional[LabelMapSpec] = None,
                num_classes: Optional[int] = None, affine_tol: float = 1e-3,
                modalities: Optional[Sequence[str]] = None, require_labels: bool = False,
                num_workers: Optional[int] = None) -> List[str]:
    """Read every image and label once and check: missing file, unreadable/truncated file, 2D or 4D
    volume, voxels that are not one real number, an image affine that places no voxel, NaN/Inf voxels,
    image/label shape mismatch (after putting the label on the image's axes), non-integer labels, label values outside
    `label_map` or >= `num_classes`, unknown modality (not in `modalities`), duplicate ids, a case
    without a label when `require_labels`.

    Returns the warnings (affine drift > `affine_tol`, an unusable label affine); raises one DataError
    listing every problem.
    """
    if not cases:
        raise DataError("no cases to check")
    mapping = None if label_map is None else parse_label_map(label_map)
    problems: List[str] = []
    counts = Counter((c.modality, c.id) for c in cases)
    problems += [f"{c.image}: duplicate case id {c.id!r} for modality {c.modality}"
                 for c in cases if counts[(c.modality, c.id)] > 1]
    if modalities is not None:
        problems += [f"{c.image}: unknown modality {c.modality!r} (known: {list(modalities)})"
                     for c in cases if c.modality not in modalities]
    if require_labels:
        problems += [f"{c.image}: no label file" for c in cases if c.label is None]
    workers = num_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda c: _check_case(c, mapping, num_classes, affine_tol), cases))
    warnings: List[str] = []
    for case_problems, case_warnings in results:
        problems += case_problems
        warnings += case_warnings
    if problems:
        raise DataError(problems)
    return warnings
