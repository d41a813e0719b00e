"""Score a folder of label maps against a folder of reference labels, without a model: ``evaluate_folders``, and
from the shell ``python -m mulmodseg.evaluate --pred DIR --labels DIR`` (``mulmodseg.cli.evaluate``; see ``--help``).

Each prediction finds its label as infer.py's ``--labels`` does (``case.nii.gz`` for ``case_0000.nii.gz``,
or the same name); every pair is checked (readable, 3D, known values, the same grid) before any is
scored, and all problems are reported at once. The results go into the files that infer.py writes
(``mulmodseg.metrics.write_reports``), with the metrics of ``mulmodseg.metrics.case_metrics`` on each
label's own voxel grid and spacing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import nibabel as nib

from mulmodseg import data as mdata
from mulmodseg.data.checks import check_label_pairs
from mulmodseg.metrics import case_metrics, write_reports
from mulmodseg.outputs import find_inputs, label_candidates, output_dir_problems, output_path
from mulmodseg.surface import check_nsd_tolerance
from mulmodseg.text.prompts import resolve_classes


def match_labels(predictions: Sequence[Path], labels_dir: Path) -> tuple[dict[Path, Path], list[str]]:
    """{prediction: its label file} and a problem for each prediction without one."""
    pairs, problems = {}, []
    for pred in predictions:
        found = [p for p in label_candidates(pred, labels_dir) if p.is_file()]
        if found:
            pairs[pred] = found[0]
        else:
            problems.append(f"{pred}: no label file with this name in {labels_dir}")
    return pairs, problems


def evaluate_folders(pred_dir: str | Path, labels_dir: str | Path, classes: str | Sequence[str] = "amos",
                     label_map=None, nsd_tolerance: float = 2.0, output_dir: str | Path | None = None,
                     modality: str = "", labelled: Sequence[str] | None = None,
                     log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> list[dict]:
    """Score every label map in ``pred_dir`` against its label in ``labels_dir`` and write the reports
    into ``output_dir`` (default: ``pred_dir``), replacing earlier ones. Both files of a pair are read as
    labels are in training (``label_map`` applied), the prediction put on the label's grid; ``modality``
    only fills the tables' modality column. A class is scored only where the labels' dataset labels it: the
    class names ``labelled``, else the ``labels`` of the dataset.json in or above ``labels_dir``, else all (the
    others are "not labelled" in the tables). Returns one row per case (see ``mulmodseg.metrics``).

    Raises DataError listing every problem (missing labels, unreadable files, other grids, unknown
    values, an unwritable ``output_dir``) before any case is scored, and ValueError for bad ``classes``
    or ``nsd_tolerance``.
    """
    names = resolve_classes(classes)
    check_nsd_tolerance(nsd_tolerance)
    labels_dir, output_dir = Path(labels_dir), Path(output_dir or pred_dir)
    problems = output_dir_problems(output_dir)
    try:
        predictions = find_inputs(pred_dir)
    except mdata.DataError as error:
        predictions = []
        problems += error.problems
    if labels_dir.is_dir():
        pairs, missing = match_labels(predictions, labels_dir)
        problems += missing
    else:
        pairs = {}
        problems.append(f"--labels {labels_dir}: no such folder")
    warnings, scored = [], None
    try:
        scored = mdata.labelled_classes(names, mdata.labels_file(labels_dir), labelled,
                                        label_map and mdata.parse_label_map(label_map))
    except mdata.DataError as error:
        problems += error.problems
    if pairs:
        try:
            warnings = check_label_pairs(list(pairs.items()), label_map, len(names), labelled=scored,
                                         class_names=names)
        except mdata.DataError as error:
            problems += error.problems
    if problems:
        raise mdata.DataError(problems)
    for warning in warnings:
        log(f"warning: {warning}")
    rows = []
    for i, (pred, label_file) in enumerate(pairs.items(), 1):
        reference = mdata.load_volume(label_file)
        truth = mdata.read_label(reference, str(label_file), reference, label_map)
        predicted = mdata.read_label(mdata.load_volume(pred), str(pred), reference, label_map)
        rows.append({"case": mdata.nifti_stem(output_path(pred, output_dir)), "modality": modality,
                     "prediction": str(pred), "reference": str(label_file),
                     **case_metrics(predicted, truth, len(names), nib.affines.voxel_sizes(reference.affine),
                                    nsd_tolerance, labelled=scored)})
        log(f"[{i}/{len(pairs)}] {pred.name}: scored against {label_file}")
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"pred": str(pred_dir), "labels": str(labels_dir), "classes": list(names), "label_map": label_map,
                "nsd_tolerance_mm": nsd_tolerance}
    setting = " ".join(filter(None, [Path(pred_dir).name, modality]))
    log(write_reports(output_dir, rows, names[1:], setting, settings))
    return rows
