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
    if case.label is None:
        return problems, warnings
    lab, values = _read(Path(case.label), "label", problems)
    if values is None:
        return problems, warnings
    if img is not None:
        unusable = affine_problem(lab.affine)
        if unusable:
            warnings.append(f"{case.label}: {unusable}; its voxels are taken to be the image's ({case.image})")
        else:
            # As read_label does: a label stored in another axis order goes onto the image's axes first.
            values, lab_affine = onto_axes(values, lab.affine, img.affine)
            drift = float(np.abs(lab_affine - np.asarray(img.affine)).max())
            if not drift <= affine_tol:
                warnings.append(f"{case.label}: affine differs from the image's by up to {drift:.4g} "
                                f"(> {affine_tol}); the image affine ({case.image}) is used")
        if values.shape != tuple(img.shape):
            problems.append(f"{case.label}: label shape {values.shape} differs from image shape "
                            f"{tuple(img.shape)} ({case.image})")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)):
            problems.append(f"{case.label}: NaN/Inf voxels in the label")
            return problems, warnings
        if not np.array_equal(values, np.round(values)):
            problems.append(f"{case.label}: label values are not integers")
            return problems, warnings
    present = [int(v) for v in _label_values(values)]
    # Hundreds of distinct values: an image where a label map should be (swapped folders, --labels).
    hint = f"; {len(present)} distinct values: is it an image rather than a label map?" if len(present) > 255 else ""
    if mapping is not None:
        unmapped = label_map_problems(present, mapping)
        if unmapped:
            problems.append(f"{case.label}: label values {_values_text(unmapped)} are not in the label map{hint}")
            return problems, warnings
        classes = sorted({mapping.get(v, 0) for v in present})
    else:
        classes = present
        out_of_range = [v for v in present if v < 0 or v > 255]
        if out_of_range:
            problems.append(f"{case.label}: label values {_values_text(out_of_range)} outside 0..255; "
                            f"give a label map{hint}")
            return problems, warnings
    if num_classes is not None:
        too_big = [v for v in classes if v >= num_classes]
        if too_big:
            problems.append(f"{case.label}: class values {_values_text(too_big)} >= num_classes={num_classes}{hint}")
    return problems, warnings


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
