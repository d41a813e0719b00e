"""Which scans a training run trains and validates on, per modality.

In order of precedence: the fold's lists of a cross-validation study (``OUT/splits.json``, made by the first
fold or copied from ``--splits``), a datalist's ``validation`` list, a ``--val_fraction`` draw, or no
validation; then ``--max_cases`` of the training scans. A resumed run must find the scans it saved.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mulmodseg import data as mdata
from mulmodseg.config import DEFAULT_FOLDS, TrainConfig, TrainingError
from mulmodseg.text.prompts import resolve_classes

SPLITS_FILE = "splits.json"  # in --out: the folds every fold of a cross-validation study shares
Cases = dict[str, list[mdata.Case]]  # modality -> its scans


def select_cases(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[Cases, Cases, mdata.Splits | None]:
    """(training scans, validation scans, the study's splits or None) of ``cfg.trained_modalities``; raises
    ``TrainingError`` when a modality is left without training scans, or ``--val_every`` without validation."""
    # A study's split covers every modality given, so that e.g. a CT-only and an ALT run share it.
    found, validation_lists = dataset_cases(cfg, cfg.data_dirs if cfg.fold is not None else cfg.trained_modalities)
    splits = study_splits(cfg, found) if cfg.fold is not None else None
    cases, val_cases = {}, {}
    for name in cfg.trained_modalities:
        scans, listed, folders = found[name], validation_lists[name], ", ".join(cfg.data_dirs[name])
        if splits is not None:
            by_id = {c.id: c for c in scans}
            train, val = ([by_id[i] for i in splits[name][cfg.fold][part]] for part in ("train", "val"))
            unused = len(scans) - len(train) - len(val)
            if listed or unused:
                log(f"{name}: fold {cfg.fold} leaves {unused} scan(s) of the training list and the "
                    f"{len(listed)} of the datalist's validation list unused")
        elif listed:
            if cfg.val_fraction:
                where = [d for d in cfg.data_dirs[name] if mdata.has_validation_list(d)]
                raise TrainingError(f"--val_fraction {cfg.val_fraction}: {where[0]}/dataset.json has a validation "
                                    f"list ({len(listed)} scans), which is the validation set; drop --val_fraction")
            held = {c.id for c in listed}
            train, val = [c for c in scans if c.id not in held], listed
        else:
            train, val = mdata.split_cases(scans, cfg.val_fraction, cfg.seed) if cfg.val_fraction else (scans, [])
        if not train:
            how = (f"--fold {cfg.fold}" if splits is not None else "the datalist's validation list" if listed
                   else f"--val_fraction {cfg.val_fraction}; lower --val_fraction")
            raise TrainingError(f"{name}: no scans left to train on: {len(scans)} in {folders}, "
                                f"{len(val)} held out by {how}")
        if name in cfg.max_cases:  # N training scans, as --max_cases says, whatever validation holds
            train = mdata.subsample(train, cfg.max_cases[name], cfg.seed)
        cases[name], val_cases[name] = train, val
    if cfg.val_every and not any(val_cases.values()):
        counts = ", ".join(f"{len(cases[n])} {n}" for n in cfg.trained_modalities)
        raise TrainingError(f"--val_every {cfg.val_every}: --val_fraction {cfg.val_fraction} holds out no scan "
                            f"of {counts}; raise --val_fraction or drop --val_every")
    return cases, val_cases, splits


def folder_labels(cfg: TrainConfig, modalities: Iterable[str]) -> dict[str, tuple[int, ...] | None]:
    """{dataset folder: the classes it labels (None: all)} of ``modalities``' folders: ``--labelled``, else the
    folder's dataset.json (``mdata.labelled_classes``). Raises one ``DataError`` listing every folder's problems."""
    classes = resolve_classes(cfg.classes)
    label_map = mdata.parse_label_map(cfg.label_map) if cfg.label_map else None
    labels, problems = {}, []
    for folder in (d for name in modalities for d in cfg.data_dirs[name]):
        datalist = Path(folder) / "dataset.json"
        try:
            labels[folder] = mdata.labelled_classes(classes, datalist if datalist.is_file() else None,
                                                    cfg.labelled.get(folder), label_map)
        except mdata.DataError as error:
            problems += error.problems
    if problems:
        raise mdata.DataError(problems)
    return labels


def dataset_cases(cfg: TrainConfig, modalities: Iterable[str]) -> tuple[Cases, Cases]:
    """(scans, the scans of the datalists' validation lists) of each of ``modalities``: those of every dataset
    folder of the modality, sorted by id, each ``Case.labelled`` holding the classes its dataset labels."""
    modalities = list(modalities)
    labels = folder_labels(cfg, modalities)
    found: Cases = {}
    listed: Cases = {}
    problems: list[str] = []
    for name in modalities:
        found[name], listed[name] = [], []
        for folder in cfg.data_dirs[name]:
            try:
                found[name] += [replace(c, labelled=labels[folder]) for c in mdata.discover_cases(folder, name)]
                listed[name] += [replace(c, labelled=labels[folder]) for c in mdata.validation_cases(folder, name)]
            except mdata.DataError as error:
                problems += error.problems
        found[name].sort(key=lambda c: c.id)
        listed[name].sort(key=lambda c: c.id)
    if problems:
        raise mdata.DataError(problems)
    return found, listed


def dataset_records(cfg: TrainConfig) -> dict[str, list[dict]]:
    """{modality: [{"dir": folder, "labelled": class names or "all"}]} of the trained modalities' datasets, as
    a checkpoint and config.json record them (a resumed run must find the same)."""
    classes = resolve_classes(cfg.classes)
    labels = folder_labels(cfg, cfg.trained_modalities)
    return {name: [{"dir": d, "labelled": "all" if labels[d] is None else [classes[k] for k in labels[d]]}
                   for d in cfg.data_dirs[name]] for name in cfg.trained_modalities}


def study_splits(cfg: TrainConfig, found: Cases) -> mdata.Splits:
    """The cross-validation study's folds: ``OUT/splits.json`` when an earlier fold wrote it (a given
    ``--splits`` must equal it), else the ``--splits`` file, else ``make_folds`` of the scans with
    ``--seed``; checked against the scans ``found``. The trainer writes them to ``OUT/splits.json`` when
    it does not exist yet."""
    ids = {name: [c.id for c in scans] for name, scans in found.items()}
    study, given = Path(cfg.out) / SPLITS_FILE, Path(cfg.splits) if cfg.splits else None
    if given is not None and not given.is_file():  # a resumed run whose file is gone: the study keeps the split
        given = None
    if study.is_file():
        splits, where = read_splits(study), study
        if given is not None and read_splits(given) != splits:
            raise TrainingError(f"--splits {given} differs from {study}, the split of this study's other folds; "
                                f"give the same file, or another --out")
    elif given is not None:
        splits, where = read_splits(given), given
    else:
        try:
            return mdata.make_folds(ids, cfg.num_folds or DEFAULT_FOLDS, cfg.seed)
        except ValueError as error:
            raise TrainingError(f"--num_folds {cfg.num_folds or DEFAULT_FOLDS}: {error}") from None
    problems = mdata.fold_problems(splits, ids, str(where))
    count = len(next(iter(splits.values()))) if not problems else 0
    if count and cfg.num_folds and count != cfg.num_folds:
        problems.append(f"{where} holds {count} folds, but --num_folds is {cfg.num_folds}")
    elif count and cfg.fold >= count:
        problems.append(f"--fold {cfg.fold}: {where} holds folds 0 to {count - 1}")
    if problems:
        raise TrainingError(f"{len(problems)} problem(s) with the split:\n  - " + "\n  - ".join(problems))
    return splits


def read_splits(path: Path) -> object:
    """The JSON in a splits file (its shape is checked by ``mulmodseg.data.fold_problems``)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"--splits {path}: unreadable ({error})") from None


def case_ids(cases: Cases, val_cases: Cases) -> dict[str, dict[str, list[str]]]:
    """{modality: {"train": ids, "val": ids}}: what a checkpoint records of the scans its run uses."""
    return {name: {"train": [c.id for c in cases[name]], "val": [c.id for c in val_cases[name]]} for name in cases}


def check_resumed_cases(saved: dict | None, now: dict[str, dict[str, list[str]]], cfg: TrainConfig) -> None:
    """Raise ``TrainingError`` when the scans found ``now`` (``case_ids``) are not the ones the checkpoint
    ``saved`` (files added to or removed from its folders): resuming would train on another set without a word."""
    if saved is None:  # a format-1 checkpoint from before the lists were saved
        if cfg.max_cases and cfg.val_fraction:
            raise TrainingError("--resume: this run was started by an older mulmodseg, which drew --max_cases "
                                "before the --val_fraction split (now after it), so its scans cannot be "
                                "found again; start a new run")
        return
    for name in now:
        for part in ("train", "val"):
            added = sorted(set(now[name][part]) - set(saved[name][part]))
            missing = sorted(set(saved[name][part]) - set(now[name][part]))
            changes = [f"{len(ids)} {what}: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}"
                       for what, ids in (("new", added), ("gone", missing)) if ids]
            if changes:
                raise TrainingError(
                    f"--resume: the {name} {'training' if part == 'train' else 'validation'} scans differ from the "
                    f"saved run's ({'; '.join(changes)}): were files added to or removed from "
                    f"{', '.join(cfg.data_dirs[name])}? Restore them, or start a new run")


def check_resumed_datasets(saved: dict | None, now: dict[str, list[dict]]) -> None:
    """Raise ``TrainingError`` when a dataset labels other classes ``now`` (``dataset_records``) than when the
    checkpoint was ``saved`` (None: a checkpoint from before datasets were recorded)."""
    if saved is None or saved == now:
        return
    was = {d["dir"]: d["labelled"] for name in saved for d in saved[name]}
    changes = [f"{d['dir']} labelled {was.get(d['dir'])}, now {d['labelled']}"
               for name in now for d in now[name] if was.get(d["dir"]) != d["labelled"]]
    raise TrainingError(f"--resume: the classes a dataset labels changed since the run started "
                        f"({'; '.join(changes)}): restore its dataset.json or --labelled, or start a new run")
