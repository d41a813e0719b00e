"""Dataset integrity check before training (in the spirit of nnU-Net's dataset check).

Every file is opened once; all problems of all cases are gathered and raised together as one DataError,
each message naming its file. Affine drift between image and label is only a warning (the label is put on
the image's axes by its own affine, then taken voxel for voxel). A scan with no intensity range is a problem;
given the preprocessing settings, so is one that they would collapse or make constant
(``preprocess.grid_problems``, ``preprocess.intensity_problem``).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from .cases import Case, DataError
from .geometry import affine_problem, onto_axes
from .labels import LabelMapSpec, label_map_problems, parse_label_map
from .preprocess import grid_problems, intensity_problem, load_volume

# modality -> every preprocessing its scans go through (preprocess.default_settings' keys; an ensemble's several)
Settings = Mapping[str, Sequence[Mapping]]


def _memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def _size(nbytes: float) -> str:
    """"1.5 GB", "2 TB"."""
    return f"{nbytes / 1e9:.3g} GB" if nbytes < 1e12 else f"{nbytes / 1e12:.3g} TB"


def _claimed_size(img) -> str:
    """What the header of `img` claims: "shape (X, Y, Z) of int16, 2 TB"."""
    return f"shape {tuple(img.shape)} of {img.get_data_dtype()}, {_size(_voxel_bytes(img))}"


def _voxel_bytes(img) -> float:
    """The bytes of voxels that the header of `img` claims."""
    return float(np.prod(img.shape, dtype=np.float64)) * np.dtype(img.get_data_dtype()).itemsize


def _read(path: Path, what: str, problems: list[str], scaled: bool = True):
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
    memory = _memory_bytes()
    if memory and _voxel_bytes(img) > memory:
        problems.append(f"{path}: its header claims {_claimed_size(img)}, more than this machine's memory "
                        f"({_size(memory)}): a broken header, or a scan to crop or split first")
        return None, None
    try:
        proxy = img.dataobj
        data = np.asanyarray(proxy) if scaled or not hasattr(proxy, "get_unscaled") else proxy.get_unscaled()
    except MemoryError:
        problems.append(f"{path}: its header claims {_claimed_size(img)}, more than the memory free to read it")
        return None, None
    except Exception as e:  # truncated gzip -> EOFError, zlib.error, OSError, ValueError
        problems.append(f"{path}: unreadable or truncated {what} data ({type(e).__name__}: {e}; its header claims "
                        f"{_claimed_size(img)})")
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


def _value_range(img, data: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) voxel value after the header's scaling, in float64, from `data` as `_read`
    returns it for an image (the stored values: only the two extremes are scaled)."""
    low, high = float(np.min(data)), float(np.max(data))
    if hasattr(img.dataobj, "get_unscaled"):
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        low, high = sorted((low * slope + inter, high * slope + inter))
    return low, high


def _modality_warning(case: Case, low: float) -> str | None:
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


def _percentiles(img, data: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """The `percentiles` of the image `img` after the header's scaling, from its stored values `data`."""
    low, high = (float(v) for v in np.percentile(data, [float(p) for p in percentiles]))
    if hasattr(img.dataobj, "get_unscaled"):
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        low, high = low * slope + inter, high * slope + inter
    return low, high


def _check_case(case: Case, mapping: Mapping[int, int] | None, num_classes: int | None,
                affine_tol: float, settings: Sequence[Mapping] = (), class_names: Sequence[str] | None = None
                ) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    img, data = _read(Path(case.image), "image", problems, scaled=False)
    unusable = None if img is None else affine_problem(img.affine)
    if unusable:
        problems.append(f"{case.image}: {unusable}")
        img = None
    for resolved in settings if img is not None else ():
        grid, small = grid_problems(str(case.image), img.shape, img.affine, resolved)
        problems += [p for p in grid if p not in problems]
        warnings += [w for w in small if w not in warnings]
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
            for resolved in settings or [{}]:
                clip = None
                if resolved.get("window") is None and resolved.get("percentiles") is not None:
                    clip = _percentiles(img, data, resolved["percentiles"])
                flat = intensity_problem(str(case.image), low, high, resolved, clip)
                if flat and flat not in problems:
                    problems.append(flat)
            warning = _modality_warning(case, low)
            if warning:
                warnings.append(warning)
    if case.label is not None:
        _check_label(Path(case.label), "label", img, case.image, "image", mapping, num_classes, affine_tol, problems,
                     warnings, case.labelled, class_names)
    return problems, warnings


def _check_label(path: Path, what: str, reference, reference_path, reference_what: str,
                 mapping: Mapping[int, int] | None, num_classes: int | None, affine_tol: float,
                 problems: list[str], warnings: list[str], labelled: Sequence[int] | None = None,
                 class_names: Sequence[str] | None = None):
    """Check the label map at `path` (called `what` in messages) on the grid of the nibabel image
    `reference` (None: no grid to compare, e.g. it was unreadable) read from `reference_path`, adding to
    `problems` and `warnings`; `labelled`: the classes its dataset labels (None: all), named by `class_names` in
    messages. Returns the label's nibabel image, or None when it cannot be read."""
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
            if not drift <= affine_tol and lab_affine is lab.affine:
                warnings.append(f"{path}: affine differs from the {reference_what}'s by up to {drift:.4g} "
                                f"(> {affine_tol}); the {reference_what} affine ({reference_path}) is used")
            elif not drift <= affine_tol:  # what is done is not what the plain drift's message says
                axes = f"{''.join(nib.aff2axcodes(lab.affine))} against {''.join(nib.aff2axcodes(reference.affine))}"
                warnings.append(f"{path}: stored in other axes than the {reference_what} ({axes}): its voxels are "
                                f"flipped/transposed onto the {reference_what}'s axes by its own affine, after which "
                                f"its affine still differs from the {reference_what}'s by up to {drift:.4g} "
                                f"(> {affine_tol}), and its voxels are taken to be the {reference_what}'s "
                                f"({reference_path}); check that the two belong together")
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
    unlabelled = [v for v in classes if v and labelled is not None and v not in labelled]
    if unlabelled:
        named = ", ".join(class_names[k] if class_names else str(k) for k in labelled)
        problems.append(f"{path}: class values {_values_text(unlabelled)} are classes its dataset does not label "
                        f"(it labels {named}): add them to the dataset.json labels or --labelled")
    return lab


def existing_output_problems(output: Path, scan: Path, label_map: LabelMapSpec | None = None,
                             num_classes: int | None = None, affine_tol: float = 1e-3) -> list[str]:
    """Why the label map `output`, which an earlier inference wrote for the scan `scan` (a readable image), cannot
    be kept (empty when it can): checked as a label is against its image (`check_cases`), and off the scan's grid
    (an affine that differs, or is unusable) is a problem too, since inference writes it on that grid."""
    problems: list[str] = []
    warnings: list[str] = []
    mapping = None if label_map is None else parse_label_map(label_map)
    _check_label(Path(output), "earlier output", load_volume(scan), scan, "scan", mapping, num_classes, affine_tol,
                 problems, warnings)
    return problems + warnings


def check_label_pairs(pairs: Sequence[tuple[Path, Path]], label_map: LabelMapSpec | None = None,
                      num_classes: int | None = None, affine_tol: float = 1e-3,
                      num_workers: int | None = None, labelled: Sequence[int] | None = None,
                      class_names: Sequence[str] | None = None) -> list[str]:
    """Check (prediction, reference label) pairs of label-map files before scoring, each file read once:
    both readable 3D label maps whose values are known (as labels are in `check_cases`), and the
    prediction on the label's grid: the same shape once put on the label's axes, and affines within
    `affine_tol` (beyond it only a warning, as between an image and its label: the voxels are taken to
    correspond); `labelled`: the classes the labels' dataset labels (None: all), which the labels must keep to.
    Returns the warnings; raises one DataError listing every problem of every pair."""
    if not pairs:
        raise DataError("no pairs to check")
    mapping = None if label_map is None else parse_label_map(label_map)

    def check(pair):
        pred, label = (Path(p) for p in pair)
        problems: list[str] = []
        warnings: list[str] = []
        reference = _check_label(label, "label", None, None, "label", mapping, num_classes, affine_tol, problems,
                                 warnings, labelled, class_names)
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


def check_cases(cases: Sequence[Case], label_map: LabelMapSpec | None = None,
                num_classes: int | None = None, affine_tol: float = 1e-3,
                modalities: Sequence[str] | None = None, require_labels: bool = False,
                num_workers: int | None = None, settings: Settings | None = None,
                class_names: Sequence[str] | None = None) -> list[str]:
    """Read every image and label once and check: missing file, unreadable/truncated file, 2D or 4D
    volume, voxels that are not one real number, an image affine that places no voxel, NaN/Inf voxels,
    image/label shape mismatch (after putting the label on the image's axes), non-integer labels, label values
    outside `label_map` or >= `num_classes` or of a class the case's dataset does not label (`Case.labelled`,
    named by `class_names`), unknown modality (not in `modalities`), duplicate ids, a case without a label when
    `require_labels`.

    An image with no intensity range (`preprocess.intensity_problem`) is a problem too; with `settings`
    (modality -> the preprocessing settings its scans go through), so is one that they would collapse to a plane
    or make constant, and one that they would shrink below the crop is a warning (`preprocess.grid_problems`).

    Returns the warnings (affine drift > `affine_tol`, an unusable label affine); raises one DataError
    listing every problem.
    """
    if not cases:
        raise DataError("no cases to check")
    mapping = None if label_map is None else parse_label_map(label_map)
    problems: list[str] = []
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
        results = list(pool.map(lambda c: _check_case(c, mapping, num_classes, affine_tol,
                                                      (settings or {}).get(c.modality, ()),
                                                      class_names), cases))
    warnings: list[str] = []
    for case_problems, case_warnings in results:
        problems += case_problems
        warnings += case_warnings
    if problems:
        raise DataError(problems)
    return warnings
