"""The files of an inference call: which scans, where each output goes, what may be written, and the writers.

``plan_outputs`` settles a call before any inference, as nnU-Net's ``_manage_input_and_output_lists`` does: the
scans (this process's ``input_share``), their label files, each output's name (``output_path``, short enough for
the file system), the overwrite rules, and an output folder apart from the inputs; every problem is reported at
once in one ``DataError``. The writers put label maps on the
scan's own grid (``write_like``), in the dataset's label values (``to_dataset_values``), beside nnU-Net's
``dataset.json`` (``dataset_description``); each file is written whole (``files.atomic_write``). ``OutputOptions``
holds the flags that ask for files beside the label maps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from mulmodseg import __version__
from mulmodseg import data as mdata
from mulmodseg.files import atomic_write, folder_problem, name_max
from mulmodseg.metrics import REPORT_FILES
from mulmodseg.viz import preview

DATASET_JSON = "dataset.json"
# The folders of a dataset's scans and labels (MSD, nnU-Net): outputs written there would be read as scans.
DATASET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


def output_path(image: Path, output_dir: Path, suffix: str = ".nii.gz") -> Path:
    """``scan_0000.nii.gz`` -> ``output_dir/scan.nii.gz`` (nnU-Net's channel suffix dropped)."""
    stem = mdata.nifti_stem(image) or image.name
    if stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
    return output_dir / f"{stem}{suffix}"


def label_candidates(image: Path, labels_dir: Path) -> list[Path]:
    """Where the label of ``image`` may be: nnU-Net's ``case.nii.gz`` (or ``.nii``) for ``case_0000.nii.gz``,
    else a file with the image's own name."""
    return list(dict.fromkeys([output_path(image, labels_dir), output_path(image, labels_dir, ".nii"),
                               labels_dir / image.name]))


def find_inputs(path: str | Path) -> list[Path]:
    """One NIfTI file, or every NIfTI file in a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        # Hidden files are macOS's ._ copies or a write left unfinished, never scans (as in training).
        files = sorted(p for p in path.iterdir() if p.is_file() and mdata.nifti_stem(p) and not p.name.startswith("."))
        if files:
            return files
        raise mdata.DataError([f"{path}: no .nii or .nii.gz files in this folder{mdata.not_nifti_hint(path)}"])
    raise mdata.DataError([f"{path}: no such file or folder"])


def output_dir_problems(output_dir: Path) -> list[str]:
    """Why ``output_dir`` cannot receive the outputs (empty when it can), found before any inference:
    a NIfTI file name (it is the folder the label maps go into), or a folder that cannot be written."""
    if mdata.nifti_stem(output_dir) and not output_dir.is_dir():
        return [f"--output {output_dir}: a file name, but --output is the folder the label maps go into "
                f"(each named like its scan), e.g. --output {output_dir.parent}"]
    problem = folder_problem(output_dir, "--output")
    return [problem] if problem else []


def input_folder_problem(output_dir: Path, inputs: Sequence[Path], labels_dir: Path | None) -> str | None:
    """Why ``output_dir`` is a folder of the inputs (None when it is not): the folder of a scan or the labels
    folder, or one inside a dataset's imagesTr, labelsTr, imagesTs or labelsTs, where label maps would mix with the
    scans (and be read as scans by the next call or a training run)."""
    out = output_dir.resolve()
    given = {p.parent.resolve(): "the scans" for p in inputs}
    if labels_dir is not None:
        given[Path(labels_dir).resolve()] = "the labels (--labels)"
    inside = next((folder for folder in (out, *out.parents) if folder.name in DATASET_FOLDERS), None)
    if out in given:
        where = f"the folder of {given[out]}"
    elif inside is not None:
        where = f"inside the dataset folder {inside}"
    else:
        return None
    return (f"--output {output_dir}: {where}, where label maps would mix with the inputs; choose another --output, "
            "or pass --into_input_folder to write there anyway")


def invert_label_map(settings: dict) -> dict[int, int] | None:
    """Training id -> the dataset's label value, when the run used a label map (dropped values excluded)."""
    mapping = settings.get("label_map")
    if not mapping:
        return None
    inverse = {}
    for src, dst in mapping.items():
        if int(dst) != 0:
            inverse[int(dst)] = int(src)
    return inverse


def written_values(num_classes: int, inverse: dict[int, int] | None) -> dict[int, int]:
    """Class id (1..K-1) -> its value in the written label maps: the id itself, or the dataset's value when
    the run used a label map (``inverse``, from ``invert_label_map``); a class without one is left out (it is
    written as background)."""
    if inverse is None:
        return {k: k for k in range(1, num_classes)}
    return {k: v for k, v in sorted(inverse.items()) if 0 < k < num_classes}


def class_file(name: str) -> str:
    """The ``--per_class`` file of class ``name``: spaces as underscores
    (``right kidney`` -> ``right_kidney.nii.gz``)."""
    return f"{name.replace(' ', '_')}.nii.gz"


def dataset_description(classes: Sequence[str], values: dict[int, int], modality: str,
                        checkpoints: Sequence[str | Path], settings: dict) -> dict:
    """dataset.json beside the label maps, in nnU-Net's form: ``labels`` (class name -> value in the files,
    background 0), ``modality`` (v1's key) and ``channel_names`` (v2's), ``file_ending``; then the checkpoint
    (a list of them for an ensemble) and the ``settings`` that made the files, and the version that wrote
    them (which marks the file as ours)."""
    paths = [str(Path(c).resolve()) for c in checkpoints]
    return {
        "labels": {classes[0]: 0, **{classes[k]: v for k, v in values.items()}},
        "modality": {"0": modality}, "channel_names": {"0": modality}, "file_ending": ".nii.gz",
        "checkpoint": paths[0] if len(paths) == 1 else paths, "settings": settings, "mulmodseg_version": __version__,
    }


def foreign_dataset_json(path: Path) -> bool:
    """Whether ``path`` is a dataset.json that infer.py did not write (a dataset's own, e.g. an MSD datalist
    that training reads), which no --overwrite may replace."""
    if not path.is_file():
        return False
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(content, dict) and "mulmodseg_version" in content)


def class_statistics(label: np.ndarray, image: np.ndarray, spacing: Sequence[float], classes: Sequence[str],
                     values: dict[int, int]) -> dict:
    """``--statistics`` of one case: for each class of ``values`` (class id -> value in the files), its value,
    voxel count, volume in mm^3 and mean intensity of ``image`` over it (None when the class is absent).
    ``label: (X, Y, Z)`` class ids and ``image: (X, Y, Z)`` the scan, both on the scan's grid of voxel sizes
    ``spacing`` (mm)."""
    flat = label.ravel()
    voxels = np.bincount(flat, minlength=len(classes))
    sums = np.bincount(flat, weights=image.ravel(), minlength=len(classes))
    voxel_mm3 = float(np.prod(spacing))
    return {classes[k]: {"value": v, "voxels": int(voxels[k]), "volume_mm3": float(voxels[k]) * voxel_mm3,
                         "mean_intensity": float(sums[k] / voxels[k]) if voxels[k] else None}
            for k, v in values.items()}


def to_dataset_values(label: np.ndarray, inverse: dict[int, int] | None) -> np.ndarray:
    """Training ids -> dataset values, in the smallest unsigned type that holds them (uint8 unless a
    label map's values need more): a lookup table of that type, so no 8-byte copy of the scan is made."""
    top = max(inverse.values()) if inverse else int(label.max(initial=0))
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    if not inverse:
        return label.astype(dtype, copy=False)
    lut = np.zeros(max(max(inverse), int(label.max(initial=0))) + 1, dtype=dtype)
    for dst, src in inverse.items():
        lut[dst] = src
    return lut[label]


def write_like(array: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """Save the label map ``array`` on ``reference``'s grid: same affine, qform/sform and codes, voxel
    sizes and units; no intensity scaling, display range, intent or description of the scan."""
    header = reference.header.copy()
    header.set_data_dtype(array.dtype)
    # A scan's display window (e.g. cal_min -1000, cal_max 2000 HU) would show labels 1..13 as black.
    header["cal_min"], header["cal_max"] = 0, 0
    header.set_intent("none")
    header["descrip"] = b"mulmodseg labels"
    out = nib.Nifti1Image(array, reference.affine, header)
    out.set_qform(reference.get_qform(), int(reference.header["qform_code"]))
    out.set_sform(reference.get_sform(), int(reference.header["sform_code"]))
    out.header.set_slope_inter(1.0, 0.0)
    atomic_write(path, lambda tmp: nib.save(out, tmp))


def write_preview(reference: nib.Nifti1Image, label: np.ndarray, path: Path,
                  names: Sequence[str] | None = None) -> None:
    """The label map (class ids) over the scan as a PNG, both turned to RAS so the view is radiological, with a
    legend of the ``names`` of the classes present."""
    image = nib.as_closest_canonical(reference)
    label = nib.as_closest_canonical(nib.Nifti1Image(label, reference.affine))
    atomic_write(path, lambda tmp: preview(np.asanyarray(image.dataobj, dtype=np.float32),
                                           np.asanyarray(label.dataobj), tmp, spacing=image.header.get_zooms()[:3],
                                           names=names))


def input_share(inputs: Sequence[Path], num_parts: int = 1, part_id: int = 0) -> list[Path]:
    """Part ``part_id`` (0-based) of ``num_parts`` of ``inputs``: every ``num_parts``-th scan by sorted file
    name, from the ``part_id``-th on, so that processes given the same list share it without overlap."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"--num_parts {num_parts} --part_id {part_id}: need --num_parts >= 1 and "
                         f"0 <= --part_id < --num_parts")
    return sorted(inputs, key=lambda p: (p.name, str(p)))[part_id::num_parts]


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What ``predict.segment_files`` writes beside each label map, and how it postprocesses the map first (on the
    scan's grid, ``mulmodseg.postprocess.postprocess``; the probabilities are not postprocessed)."""

    probabilities: bool = False  # NAME_probabilities.npz: the softmax (K, X, Y, Z) as float16
    preview: bool = False  # NAME.png
    per_class: bool = False  # NAME/<class>.nii.gz, one binary map per class
    statistics: bool = False  # NAME_statistics.json (outputs.class_statistics)
    keep_largest: Sequence[str] | None = None  # classes that keep only their largest component; [] all of them
    min_component_mm3: float | None = None  # components under this volume removed

    def __post_init__(self) -> None:
        if self.min_component_mm3 is not None and not self.min_component_mm3 > 0:
            raise ValueError(f"--min_component_mm3 {self.min_component_mm3}: must be a volume above 0 mm^3")


@dataclasses.dataclass
class Plan:
    """What one inference call reads and writes, settled by ``plan_outputs`` before any inference."""

    output_dir: Path
    inputs: list[Path]  # this process's scans, in order
    targets: dict[Path, Path]  # scan -> its label map
    labels: dict[Path, Path]  # scan -> its label file, when a labels folder is given
    done: set[Path]  # scans whose outputs all exist (skip_existing): not segmented again
    probabilities: bool = False  # NAME_probabilities.npz
    preview: bool = False  # NAME.png
    statistics: bool = False  # NAME_statistics.json
    class_files: dict[int, str] = dataclasses.field(default_factory=dict)  # class id -> NAME/<file> (per_class)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def path(self, src: Path, suffix: str) -> Path:
        """The output of scan ``src`` ending in ``suffix`` (``""``: the folder of its class files)."""
        return output_path(src, self.output_dir, suffix)

    def case_outputs(self, src: Path) -> list[Path]:
        """Every file the call writes for scan ``src``, its label map first."""
        extras = [suffix for suffix, wanted in (("_probabilities.npz", self.probabilities), (".png", self.preview),
                                                ("_statistics.json", self.statistics)) if wanted]
        return [self.targets[src], *(self.path(src, suffix) for suffix in extras),
                *(self.path(src, "") / name for name in self.class_files.values())]


def plan_outputs(inputs: Sequence[Path], output_dir: Path, labels_dir: Path | None = None, *,
                 probabilities: bool = False, preview: bool = False, statistics: bool = False,
                 class_files: dict[int, str] | None = None, overwrite: bool = False, skip_existing: bool = False,
                 num_parts: int = 1, part_id: int = 0, into_input_folder: bool = False) -> Plan:
    """The ``Plan`` of segmenting part ``part_id`` of ``num_parts`` of ``inputs`` into ``output_dir``, with the
    optional outputs asked for; raises one ``DataError`` listing every problem.

    Problems: an input that is not a NIfTI file; ``output_dir`` cannot be written, or is a folder of the inputs
    (``input_folder_problem``, unless ``into_input_folder``); ``labels_dir`` is not a folder; two scans (of any part)
    would write one file; an output's name is longer than the file system allows; a scan has no label file in
    ``labels_dir``; an output would replace an input scan or label file, or a dataset.json that inference did not
    write (even with ``overwrite``); without ``overwrite`` or ``skip_existing``, an output exists (label maps, the
    optional files, dataset.json unless parts share the folder, the evaluation tables when labels are given). With
    ``skip_existing`` a scan whose outputs all exist is ``done``.
    """
    given_inputs = [Path(p) for p in inputs]
    problems = [f"{p}: not a NIfTI file; only .nii and .nii.gz files are read (convert .nrrd, .mha or DICOM to NIfTI "
                "first)" for p in given_inputs if not mdata.nifti_stem(p)]
    everything = [p for p in given_inputs if mdata.nifti_stem(p)]
    todo = input_share(everything, num_parts, part_id)
    plan = Plan(output_dir, todo, {p: output_path(p, output_dir) for p in todo}, {}, set(), probabilities, preview,
                statistics, dict(class_files or {}))
    problems += output_dir_problems(output_dir)
    elsewhere = None if into_input_folder else input_folder_problem(output_dir, everything, labels_dir)
    if elsewhere:
        problems.append(elsewhere)
    if labels_dir is not None and not Path(labels_dir).is_dir():
        problems.append(f"--labels {labels_dir}: {'not a folder' if Path(labels_dir).exists() else 'no such folder'}")
        labels_dir = None
    writers: dict[Path, Path] = {}
    for src in everything:  # over every part's scans: two parts must not write one file either
        dst = output_path(src, output_dir)
        if dst in writers:
            problems.append(f"{src}: would write {dst}, as {writers[dst]} does; rename one of them")
        writers.setdefault(dst, src)
    limit = name_max(output_dir)
    for src in todo:
        for path in plan.case_outputs(src):
            if len(path.name.encode()) > limit:
                problems.append(f"{path}: its name is {len(path.name.encode())} bytes long, and the file system of "
                                f"{output_dir} allows {limit}; shorten the name of {src}")
    for src in todo if labels_dir is not None else []:
        found = [p for p in label_candidates(src, Path(labels_dir)) if p.is_file()]
        if not found:
            problems.append(f"{src}: no label file with this name in {labels_dir}")
        else:
            plan.labels[src] = found[0]
    # X_0001 beside X_0000 may be nnU-Net's second channel of X (training refuses it) or a scan of its own
    # (scans numbered from 0): segmented as a scan, with a word.
    stems = {mdata.nifti_stem(p): p for p in todo}
    label_stems = {mdata.nifti_stem(p) for p in plan.labels.values()}
    plan.warnings = [f"{path}: segmented as a scan of its own, but beside {stem[:-5]}_0000 it may be nnU-Net's "
                     f"channel {stem[-4:]} of one case; this model takes one channel" for stem, path in stems.items()
                     if mdata.is_extra_channel(stem, stems, label_stems)]
    # Scans and labels are never written over, even with --overwrite.
    given = {p.resolve(): "scan" for p in todo} | {p.resolve(): "label file" for p in plan.labels.values()}
    # Nothing else this call would write may already exist: dataset.json, and the evaluation's tables when
    # labels are given.
    outputs = [] if labels_dir is None else [output_dir / n for n in REPORT_FILES]
    if foreign_dataset_json(output_dir / DATASET_JSON):
        problems.append(f"{output_dir / DATASET_JSON}: not written by infer.py (a dataset's own description?), so it "
                        "is never replaced, even with --overwrite; choose another --output")
    elif num_parts == 1:  # the parts of a shared folder each write the same dataset.json
        outputs.append(output_dir / DATASET_JSON)
    for src in todo:
        outputs += plan.case_outputs(src)
        if skip_existing and all(p.is_file() for p in plan.case_outputs(src)):
            plan.done.add(src)
    for path in outputs:
        if path.resolve() in given:
            problems.append(f"{path}: the output would replace an input {given[path.resolve()]}; "
                            "choose another --output")
        elif path.exists() and not (overwrite or skip_existing):
            problems.append(f"{path}: exists; pass --overwrite to replace it, or --skip_existing to keep it")
    if problems:
        raise mdata.DataError(list(dict.fromkeys(problems)))  # two scans writing one output: each problem once
    return plan
