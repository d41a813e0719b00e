"""Cases on disk: the `Case` record, `DataError`, and discovery of the common dataset layouts.

Supported layouts (each file `.nii` or `.nii.gz`):
- MSD / nnU-Net folders: `imagesTr/` + `labelsTr/` (label has the image's name, or the image carries
  nnU-Net's `_0000` channel suffix), `imagesTs/` (+ optional `labelsTs/`) for split="test";
- an MSD `dataset.json` datalist in the root (`training` / `validation` / `test` lists of
  `{"image", "label"}` or plain image paths), paths relative to the root;
- the reference layout: `<id>.nii.gz` next to `<id>_gt.nii.gz` in one folder;
- a bare folder of images (split="test" only, no labels).
Discovery never reads image data; a label or image that should exist but does not is returned with
its expected path, so that `check_cases` reports it together with every other problem.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from mulmodseg.errors import UserError

PathLike = Union[str, Path]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SPLIT_KEYS = {"train": "training", "val": "validation", "test": "test"}
_CHANNEL = re.compile(r"_\d{4}$")


class DataError(UserError):
    """One or more problems with the data; `problems` lists all of them, each naming its file."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} data problem(s):\n{lines}")


@dataclass(frozen=True)
class Case:
    """One scan: image path, label path (None when unlabelled), modality name (e.g. "CT", "MR") and the classes its
    dataset labels (``labelled_classes``: a 0 in a partially labelled scan is background or an unlabelled class)."""

    id: str
    image: Path
    label: Path | None
    modality: str
    labelled: tuple[int, ...] | None = None  # the foreground classes its dataset labels; None: every class


def nifti_stem(path: PathLike) -> str | None:
    """File name without `.nii`/`.nii.gz`, or None when the file is not NIfTI."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


_LAYOUT_NAMES = {"imagesTr", "labelsTr", "imagesTs", "labelsTs"}


def not_nifti_hint(folder: PathLike) -> str:
    """'' or a clause saying what ``folder`` holds instead of NIfTI files (DICOM series, .mha, ...) and
    how to convert it, for a message about a folder where no scan was found."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    kinds: dict[str, int] = {}
    for p in folder.iterdir():
        if p.name.startswith(".") or p.name in _LAYOUT_NAMES or nifti_stem(p) or p.suffix in (".json", ".txt", ".md"):
            continue
        # The last suffix only (DICOM files are often named by UID, 1.2.840.113619.2.55.3.dcm), or .tar.gz etc.
        suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
        kind = "folders" if p.is_dir() else (f"{suffix} files" if suffix else "files without an extension")
        kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        return ""
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda item: (-item[1], item[0]))[:3])
    return (f"; {folder} holds {found}, but only .nii and .nii.gz files are read: convert DICOM series "
            "(e.g. with dcm2niix) and .mha/.nrrd files (e.g. with SimpleITK) to NIfTI first")


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Map stem -> path for the NIfTI files directly inside `folder` (hidden files skipped)."""
    found = {}
    for p in sorted(folder.iterdir()):
        stem = nifti_stem(p)
        if stem is not None and p.is_file() and not p.name.startswith("."):
            found[stem] = p
    return found


def _from_datalist(root: Path, datalist: dict, modality: str, split: str) -> list[Case]:
    cases = []
    for entry in datalist.get(_SPLIT_KEYS[split]) or []:
        image = root / (entry if isinstance(entry, str) else entry["image"])
        label = None if isinstance(entry, str) or not entry.get("label") else root / entry["label"]
        case_id = nifti_stem(image) or image.name
        # nnU-Net v1 datalists name the case; the file on disk carries the _0000 channel suffix.
        channel_file = image.with_name(f"{case_id}_0000{image.name[len(case_id):]}")
        if not image.exists() and channel_file.exists():
            image = channel_file
        cases.append(Case(case_id, image, label, modality))
    return cases


def is_extra_channel(stem: str, images: Collection[str], labels: Collection[str]) -> bool:
    """Whether the image ``stem`` is nnU-Net's channel 1, 2, ... of a case: X_0001 beside X_0000 among
    the ``images`` stems, unless the ``labels`` stems name X_0000 or X_0001 in full (then the digits
    are part of the case ids)."""
    if not _CHANNEL.search(stem) or stem.endswith("_0000"):
        return False
    base = stem[:-5]
    return f"{base}_0000" in images and stem not in labels and f"{base}_0000" not in labels


def _from_folders(images_dir: Path, labels_dir: Path | None, modality: str, labels_required: bool) -> list[Case]:
    images = _nifti_files(images_dir)
    labels = _nifti_files(labels_dir) if labels_dir is not None and labels_dir.is_dir() else {}
    # "_0000" is nnU-Net's channel suffix when every image has it or when the label lacks it: AMOS ids
    # such as amos_0001 end in four digits too. X_0001 beside X_0000 is a second channel, unless the
    # labels name X_0000 in full: then the ids carry the digits, and X_0001 is a case whose label is missing.
    all_suffixed = all(s.endswith("_0000") for s in images)
    by_id: dict[str, Path] = {}
    problems = []
    for stem, path in images.items():
        base = stem[:-5] if _CHANNEL.search(stem) else None
        if is_extra_channel(stem, images, labels):
            problems.append(f"{path}: multi-channel input (nnU-Net channel {stem[-4:]}) is not supported")
            continue
        nnunet = stem.endswith("_0000") and stem not in labels and (base in labels or all_suffixed)
        by_id[base if nnunet else stem] = path
    if problems:
        raise DataError(problems)
    cases = []
    for case_id in sorted(set(by_id) | set(labels)):
        image = by_id.get(case_id, images_dir / f"{case_id}.nii.gz")
        label = labels.get(case_id)
        if label is None and labels_required:
            label = (labels_dir or images_dir) / f"{case_id}.nii.gz"
        cases.append(Case(case_id, image, label, modality))
    return cases


def _from_reference(root: Path, modality: str, labels_required: bool) -> list[Case]:
    files = _nifti_files(root)
    labels = {s[:-3]: p for s, p in files.items() if s.endswith("_gt")}
    images = {s: p for s, p in files.items() if not s.endswith("_gt")}
    cases = []
    for case_id in sorted(set(images) | set(labels)):
        label = labels.get(case_id)
        if label is None and labels_required:
            label = root / f"{case_id}_gt.nii.gz"
        cases.append(Case(case_id, images.get(case_id, root / f"{case_id}.nii.gz"), label, modality))
    return cases


def discover_cases(root: PathLike, modality: str, split: str = "train") -> list[Case]:
    """All cases of one modality under `root`, sorted by id.

    split: "train" (labels required), "val" (datalist `validation` list only) or "test" (labels optional).
    Detection order: `dataset.json` with a list for the split, `imagesTr`/`imagesTs` folders, then the
    reference `<id>` + `<id>_gt` layout (or bare images for "test"). The datalist does not filter by
    modality; use `discover_amos` for AMOS, where CT and MR share one datalist.
    Raises DataError when the folder is missing or holds no case.
    """
    if split not in _SPLIT_KEYS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_KEYS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        what = "a file, not a dataset folder; give its folder" if root.exists() else "dataset folder does not exist"
        raise DataError(f"{root}: {what}")
    labels_required = split != "test"
    datalist_file = root / "dataset.json"
    cases: list[Case] = []
    datalist = _read_datalist(datalist_file)
    if datalist is not None and isinstance(datalist.get(_SPLIT_KEYS[split]), list):
        cases = _from_datalist(root, datalist, modality, split)
    elif split == "train" and (root / "imagesTr").is_dir():
        cases = _from_folders(root / "imagesTr", root / "labelsTr", modality, True)
    elif split == "test" and (root / "imagesTs").is_dir():
        cases = _from_folders(root / "imagesTs", root / "labelsTs", modality, False)
    elif split != "val":
        cases = _from_reference(root, modality, labels_required)
    if not cases:
        searched = root / ("imagesTr" if split == "train" else "imagesTs")
        raise DataError(f"{root}: no {split} cases found (looked for dataset.json, imagesTr/imagesTs, "
                        f"<id>.nii.gz + <id>_gt.nii.gz){not_nifti_hint(searched if searched.is_dir() else root)}")
    return sorted(cases, key=lambda c: c.id)


def _read_datalist(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable dataset.json ({e})") from e
    return data if isinstance(data, dict) else None


def has_validation_list(root: PathLike) -> bool:
    """Whether `root` holds a `dataset.json` with a non-empty `validation` list (False for an unreadable
    file too: discovery reports that)."""
    try:
        datalist = _read_datalist(Path(root) / "dataset.json")
    except DataError:
        return False
    return bool(datalist and isinstance(datalist.get(_SPLIT_KEYS["val"]), list) and datalist[_SPLIT_KEYS["val"]])


def validation_cases(root: PathLike, modality: str) -> list[Case]:
    """The cases of the `validation` list of `root`'s `dataset.json`, sorted by id ([] without one)."""
    return discover_cases(root, modality, "val") if has_validation_list(root) else []


def amos_modality(case_id: str) -> str:
    """AMOS convention: scans numbered above 500 are MR, the others CT."""
    match = re.search(r"(\d+)$", case_id)
    if match is None:
        raise DataError(f"{case_id}: not an AMOS case id (expected a trailing number, e.g. amos_0507)")
    return "MR" if int(match.group(1)) > 500 else "CT"


def discover_amos(root: PathLike, split: str = "train") -> dict[str, list[Case]]:
    """AMOS (`dataset.json` in `root`, CT and MR in one folder) -> {"CT": [...], "MR": [...]}."""
    cases = discover_cases(root, "CT", split)
    by_modality: dict[str, list[Case]] = {"CT": [], "MR": []}
    for case in cases:
        modality = amos_modality(case.id)
        by_modality[modality].append(Case(case.id, case.image, case.label, modality))
    return by_modality


def discover_modalities(root: PathLike, split: str = "train") -> dict[str, list[Case]]:
    """{modality: cases} for a root whose `dataset.json` names one folder per modality in
    "modality_dirs" (e.g. {"CT": "ct", "MR": "mr"}, as the bundled sample), each folder in any layout
    `discover_cases` reads."""
    datalist = _read_datalist(Path(root) / "dataset.json")
    dirs = (datalist or {}).get("modality_dirs")
    if not isinstance(dirs, dict) or not dirs:
        raise DataError(f"{Path(root) / 'dataset.json'}: no \"modality_dirs\" mapping of modality -> folder")
    return {modality: discover_cases(Path(root) / folder, modality, split) for modality, folder in dirs.items()}


def class_key(name: str) -> str:
    """A class name as names are compared: lower case, ``_`` and ``-`` as spaces, single spaces."""
    return " ".join(re.sub(r"[_\-]", " ", str(name)).lower().split())


def labels_file(folder: PathLike) -> Path | None:
    """The ``dataset.json`` that describes the labels in ``folder``: in it, else in its parent (the dataset root of
    an ``imagesTr``/``labelsTr`` layout), else None."""
    for candidate in (Path(folder) / "dataset.json", Path(folder).parent / "dataset.json"):
        if candidate.is_file():
            return candidate
    return None


def labelled_classes(classes: Sequence[str], dataset_json: PathLike | None = None,
                     given: Sequence[str] | None = None, label_map: Mapping[int, int] | None = None,
                     ) -> tuple[int, ...] | None:
    """The foreground classes (indices into ``classes``, background first) that a dataset labels: the names
    ``given`` (``--labelled DIR=liver,spleen``), else the ``labels`` of its ``dataset.json`` (MSD's
    ``{"1": "spleen"}`` or nnU-Net v2's ``{"spleen": 1}``; each name must be one of ``classes`` and its value
    that class's index, after ``label_map``), else every class. Returns None when every class is labelled.
    Raises DataError listing every unknown name and every value that is not its class's index."""
    index = {class_key(name): k for k, name in enumerate(classes)}
    where = "--labelled" if given is not None else str(dataset_json)
    named: list[tuple[int | None, str]] = []  # (value in the label files or None, name)
    if given is not None:
        named = [(None, name) for name in given]
    elif dataset_json is not None:
        labels = (_read_datalist(Path(dataset_json)) or {}).get("labels")
        if not isinstance(labels, dict):
            return None
        for key, value in labels.items():
            numeric = str(key).strip().isdigit()
            name, number = (value, key) if numeric else (key, value)
            if not isinstance(number, (int, str)) or not str(number).strip().isdigit():
                raise DataError(f"{where}: label {key!r}: {value!r} is not a label value (region labels are not "
                                "supported)")
            named.append((int(number), str(name)))
    else:
        return None
    problems, found = [], set()
    for value, name in named:
        k = index.get(class_key(name))
        if k is None:
            problems.append(f"{where}: class {name!r} is not one of the run's classes ({', '.join(classes[1:])}); "
                            "rename it, or pass --classes with it")
            continue
        stored = value if value is None or label_map is None else label_map.get(value, 0)
        if stored is not None and stored != k:
            problems.append(f"{where}: label value {value} is named {name!r}, which is class {k} of the run's "
                            f"classes; map it with --label_map {value}:{k}")
        if k:
            found.add(k)
    if problems:
        raise DataError(problems)
    return None if found >= set(range(1, len(classes))) else tuple(sorted(found))
