"""Evaluation: per-class Dice, NSD and HD95 (of :mod:`mulmodseg.surface`) of label maps, summaries over
cases, CSV/Markdown/JSON tables (a model's cost: :mod:`mulmodseg.cost`).

Conventions (background, class 0, is never scored):

- a class absent from both the prediction and the label is *absent*: NaN in arrays, an empty cell in the
  CSV files, ``absent`` in the Markdown, ``null`` in JSON, and left out of every mean (MONAI's
  ``DiceMetric`` with ``ignore_empty=True`` gives NaN whenever the label lacks the class; here a class
  predicted but not in the label is scored, since it is a real error);
- a class present in exactly one of them has Dice 0, NSD 0 and HD95 equal to the diagonal of the volume in
  mm (see :mod:`mulmodseg.surface`): longer than any distance inside the volume, and finite, so means stay
  numbers;
- a class the reference's dataset does not label (a partially labelled dataset, e.g. CHAOS MR labels four
  organs) is *not labelled*: NaN like absent, so a prediction of an unlabelled organ is no false positive,
  but ``not labelled`` in every table (``null`` in JSON) rather than absent (:func:`mask_unlabelled`).

A *row* is one evaluated case: ``{"case": str, "modality": str, "dice": (C,), "nsd": (C,), "hd95": (C,)}``
with ``C = num_classes - 1`` foreground classes, as :func:`case_metrics` gives them (``nsd`` and ``hd95``
are optional: tables hold the metrics the rows have), and ``"labelled": (C,) bool`` when not every class is
labelled. A *summary* is what :func:`summarise` returns for
a list of rows and one metric.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mulmodseg.surface import surface_metrics_per_class

__all__ = [
    "METRICS",
    "case_metrics",
    "mask_unlabelled",
    "row_metrics",
    "dice_per_class",
    "summarise",
    "write_metrics_csv",
    "summary_rows",
    "markdown_table",
    "write_summary_csv",
    "write_summary_json",
    "write_reports",
    "REPORT_FILES",
]

ABSENT = "absent"
NOT_LABELLED = "not labelled"
REPORT_FILES = ("metrics.csv", "summary.md", "summary.csv", "summary.json")
# Metric key -> (name in tables, scale for the summary tables, unit there).
METRICS = {"dice": ("Dice", 100.0, "%"), "nsd": ("NSD", 100.0, "%"), "hd95": ("HD95", 1.0, "mm")}
_CHUNK = 1 << 24  # voxels per bincount pass: bounds the int64 temporaries for 512x512x1000 volumes


def case_metrics(pred: np.ndarray, label: np.ndarray, num_classes: int, spacing: Sequence[float],
                 nsd_tolerance: float = 2.0, labelled: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Dice, NSD at ``nsd_tolerance`` mm and HD95 in mm of classes 1..num_classes-1 of one case, with the
    surfels of DeepMind's ``surface-distance`` (see :mod:`mulmodseg.surface`); the classes outside ``labelled``
    (those the label's dataset labels; None: all) are "not labelled" (:func:`mask_unlabelled`).

    pred, label: integer (X, Y, Z) on the same grid, values in [0, num_classes); spacing: mm per axis.
    Returns ``{"dice", "nsd", "hd95"}``, each float64 (num_classes - 1,). Each class is measured inside
    the bounding box of its voxels in either map (padded by one voxel for the surfels), which holds both
    surfaces whole: a 488x404x448 scan with 12 organs takes about 10 s on 2 CPU cores.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    dice = dice_per_class(pred, label, num_classes)  # also checks the values
    nsd, hd95 = surface_metrics_per_class(pred, label, num_classes, spacing, nsd_tolerance)
    return mask_unlabelled({"dice": dice, "nsd": nsd, "hd95": hd95}, labelled)


def mask_unlabelled(scores: dict[str, np.ndarray], labelled: Sequence[int] | None) -> dict[str, np.ndarray]:
    """``scores`` (metric -> (C,), as :func:`case_metrics` gives them) with the classes that ``labelled`` (the
    foreground class indices 1..C that the reference's dataset labels; None: all) leaves out set to NaN, and
    ``"labelled": (C,) bool`` added when it leaves one out."""
    if labelled is None:
        return dict(scores)
    size = len(next(iter(scores.values())))
    mask = np.zeros(size, dtype=bool)
    mask[[k - 1 for k in labelled]] = True
    return {**{m: np.where(mask, np.asarray(v, dtype=np.float64), np.nan) for m, v in scores.items()}, "labelled": mask}


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of classes 1..num_classes-1 between two label maps of the same shape.

    pred, label: integer arrays (any shape, e.g. (X, Y, Z)) with values in [0, num_classes).
    Returns float64 (num_classes - 1,): 1 for a perfect match, NaN where the class is in neither map.
    """
    pred = np.asarray(pred).reshape(-1)
    label = np.asarray(label).reshape(-1)
    if pred.shape != label.shape:
        raise ValueError(f"prediction has {pred.size} voxels, label {label.size}")
    # confusion[l, p] = number of voxels with label l and prediction p, from one bincount of l*K + p.
    confusion = np.zeros(num_classes * num_classes, dtype=np.int64)
    for start in range(0, pred.size, _CHUNK):
        p = pred[start : start + _CHUNK].astype(np.int64)
        t = label[start : start + _CHUNK].astype(np.int64)
        if p.min(initial=0) < 0 or t.min(initial=0) < 0 or max(p.max(initial=0), t.max(initial=0)) >= num_classes:
            raise ValueError(f"label values must lie in [0, {num_classes})")
        confusion += np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    overlap = np.diag(confusion)[1:].astype(np.float64)
    total = (confusion.sum(0) + confusion.sum(1))[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * overlap / total, np.nan)


def summarise(rows: Sequence[dict], metric: str = "dice") -> dict:
    """Per-class mean and standard deviation of ``metric`` over cases, ignoring cases where the class is absent.

    Returns ``{"per_class": (C,) float64 means, NaN for a class absent in every case; "std": (C,) the
    population standard deviation (numpy's ``std``, ddof=0) of the same values; "present": (C,) int64,
    cases where the class is present; "labelled": (C,) int64, cases whose reference labels the class;
    "mean": float, the mean of the non-NaN per-class means (the table's Average column); "case_std": float,
    the standard deviation over cases of each case's mean over its present classes (the Average's spread);
    "cases": int}``.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    values = np.stack([np.asarray(row[metric], dtype=np.float64) for row in rows])  # (cases, C)
    present = (~np.isnan(values)).sum(0)
    with np.errstate(invalid="ignore"):
        per_class = np.where(present > 0, np.nansum(values, 0) / np.maximum(present, 1), np.nan)
        std = np.where(present > 0, np.sqrt(np.nansum((values - per_class) ** 2, 0) / np.maximum(present, 1)), np.nan)
    scored = per_class[~np.isnan(per_class)]
    case_means = np.array([_mean(v) for v in values])
    case_means = case_means[~np.isnan(case_means)]
    return {
        "per_class": per_class,
        "std": std,
        "present": present,
        "labelled": np.stack([_labelled(row, values.shape[1]) for row in rows]).sum(0),
        "mean": float(scored.mean()) if scored.size else math.nan,
        "case_std": float(case_means.std()) if case_means.size else math.nan,
        "cases": len(rows),
    }


def row_metrics(rows: Sequence[dict]) -> list[str]:
    """The keys of :data:`METRICS` that the rows hold, in the order of METRICS."""
    return [m for m in METRICS if rows and m in rows[0]]


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str]) -> None:
    """One line per case, numbers only: ``case, modality``, the Dice (0..1) per class and ``mean`` (the
    mean over the case's present classes), then, when the rows hold them, ``NSD <class>`` ... ``NSD mean``
    (0..1) and ``HD95 <class>`` ... ``HD95 mean`` (mm). An absent class is an empty cell, a class the case's
    reference does not label ``not labelled``.

    class_names: the C foreground names (no background).
    """
    metrics = row_metrics(rows)
    names = _check_names(class_names, len(rows[0]["dice"]) if rows else None)
    header = ["case", "modality", *names, "mean"]
    for metric in metrics[1:]:
        label = METRICS[metric][0]
        header += [f"{label} {name}" for name in [*names, "mean"]]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            cells = [row["case"], row["modality"]]
            for metric in metrics:
                values = np.asarray(row[metric], dtype=np.float64)
                cells += [_number(v, 1.0, 6) if known else NOT_LABELLED
                          for v, known in zip([*values, _mean(values)], [*_labelled(row, len(values)), True])]
            writer.writerow(cells)


def summary_rows(settings: dict[str, dict], class_names: Sequence[str], metric: str = "dice", std: bool = False
                 ) -> list[list[str]]:
    """The paper's layout as text cells: a header, then one row per setting, one column per organ, then
    ``Average``. Dice and NSD in percent, HD95 in mm, with two decimals; ``absent`` where no case had the
    class, ``not labelled`` where no case's reference labels it. With ``std``, each cell is ``mean ± std`` (the
    Average's spread is ``case_std``, see :func:`summarise`).

    settings: setting name (e.g. ``"CT, ALT"``) -> a :func:`summarise` result for ``metric``.
    """
    scale = METRICS[metric][1]
    table = [["Setting", *class_names, "Average"]]
    for name, summary in settings.items():
        _check_names(class_names, len(summary["per_class"]))
        cells = []
        labelled = [*summary.get("labelled", np.ones(len(summary["per_class"]))), 1]
        for mean, spread, known in zip([*summary["per_class"], summary["mean"]],
                                       [*summary["std"], summary["case_std"]], labelled):
            if not known:
                cells.append(NOT_LABELLED)
            elif math.isnan(mean):
                cells.append(ABSENT)
            else:
                cells.append(_number(mean, scale, 2) + (f" ± {_number(spread, scale, 2)}" if std else ""))
        table.append([name, *cells])
    return table


def markdown_table(settings: dict[str, dict], class_names: Sequence[str], metric: str = "dice",
                   std: bool = False) -> str:
    """:func:`summary_rows` as a Markdown table (Dice and NSD in %, HD95 in mm), ending with a newline."""
    header, *body = summary_rows(settings, class_names, metric, std)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_summary_csv(path: str | os.PathLike, settings: dict[str, dict[str, dict]], class_names: Sequence[str]
                      ) -> None:
    """The summary tables as CSV, numbers only: ``setting, metric, statistic``, one column per class, then
    ``Average``. For each setting and metric (``dice``, ``nsd`` in %; ``hd95`` in mm) three lines: ``mean``,
    ``std`` and ``n`` (cases where the class is present; the Average's is the number of cases), as in
    :func:`summary_rows` with ``std``. An absent class is an empty cell, a class no case's reference labels
    ``not labelled``.

    settings: setting name -> metric key -> a :func:`summarise` result.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "metric", "statistic", *class_names, "Average"])
        for name, summaries in settings.items():
            for metric, summary in summaries.items():
                scale = METRICS[metric][1]
                _check_names(class_names, len(summary["per_class"]))
                means = [*summary["per_class"], summary["mean"]]
                spreads = [*summary["std"], summary["case_std"]]
                known = [*summary.get("labelled", np.ones(len(means) - 1)), 1]
                writer.writerow([name, metric, "mean", *(_number(v, scale, 2) if k else NOT_LABELLED
                                                         for v, k in zip(means, known))])
                writer.writerow([name, metric, "std", *(_number(v, scale, 2) if k else NOT_LABELLED
                                                        for v, k in zip(spreads, known))])
                writer.writerow([name, metric, "n", *map(int, summary["present"]), summary["cases"]])


def write_summary_json(path: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str], setting: str,
                       settings: dict) -> None:
    """nnU-Net's ``summary.json`` layout for one setting: ``setting``, ``settings`` (how it was scored),
    ``classes``, ``foreground_mean`` (metric -> the mean of the per-class means, and ``case_std``),
    ``mean`` (class -> metric -> ``mean``, ``std``, ``n`` and, where a reference does not label every class,
    ``labelled``: the cases whose reference labels it) and
    ``metric_per_case`` (each row's other keys, with ``metrics``: class -> metric -> value). Values are
    fractions (Dice, NSD) and mm (HD95), unrounded; absent and not labelled are ``null`` (a row's ``labelled``
    lists the classes its reference labels when that is not all of them).
    """
    metrics = row_metrics(rows)
    names = _check_names(class_names, len(rows[0]["dice"]) if rows else None)
    summaries = {m: summarise(rows, m) for m in metrics}
    partial = any("labelled" in row for row in rows)
    report = {
        "setting": setting,
        "settings": settings,
        "classes": names,
        "foreground_mean": {m: {"mean": _json(s["mean"]), "case_std": _json(s["case_std"])}
                            for m, s in summaries.items()},
        "mean": {name: {m: {"mean": _json(s["per_class"][c]), "std": _json(s["std"][c]), "n": int(s["present"][c]),
                            **({"labelled": int(s["labelled"][c])} if partial else {})}
                        for m, s in summaries.items()} for c, name in enumerate(names)},
        "metric_per_case": [
            {**{k: v for k, v in row.items() if k not in METRICS and k != "labelled"},
             **({"labelled": [n for n, k in zip(names, row["labelled"]) if k]} if "labelled" in row else {}),
             "metrics": {name: {m: _json(row[m][c]) for m in metrics} for c, name in enumerate(names)}}
            for row in rows
        ],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def write_reports(output_dir: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str], setting: str,
                  settings: dict, note: str = "") -> str:
    """Write :data:`REPORT_FILES` into ``output_dir``: metrics.csv (one line per case), summary.md (a
    table per metric, mean ± std over cases, then ``note``), summary.csv and summary.json. This is the one
    writer of evaluation results (``mulmodseg.evaluate`` and infer.py's ``--labels``). Returns the Markdown.

    rows: as :func:`case_metrics` gives them plus ``case`` and ``modality`` (and any other keys, which go
    into summary.json); class_names: the C foreground names; setting: the row name of the tables (e.g.
    ``"unet CT"``); settings: how the cases were scored, for summary.json.
    """
    output_dir = Path(output_dir)
    metrics = row_metrics(rows)
    summaries = {m: summarise(rows, m) for m in metrics}
    parts = []
    for metric, summary in summaries.items():
        name, _, unit = METRICS[metric]
        tolerance = (f" at {settings['nsd_tolerance_mm']:g} mm" if metric == "nsd" and "nsd_tolerance_mm" in settings
                     else "")
        parts.append(f"{name}{tolerance} ({unit}), mean ± std over {summary['cases']} case(s):\n\n"
                     + markdown_table({setting: summary}, class_names, metric, std=True))
    markdown = "\n".join(parts) + (f"\n{note}\n" if note else "")
    write_metrics_csv(output_dir / "metrics.csv", rows, class_names)
    (output_dir / "summary.md").write_text(markdown, encoding="utf-8")
    write_summary_csv(output_dir / "summary.csv", {setting: summaries}, class_names)
    write_summary_json(output_dir / "summary.json", rows, class_names, setting, settings)
    return markdown


def _number(value: float, scale: float, decimals: int) -> str:
    """A CSV cell: the scaled value, or empty for NaN (absent)."""
    return "" if math.isnan(value) else f"{value * scale:.{decimals}f}"


def _labelled(row: dict, size: int) -> np.ndarray:
    """A row's (C,) bool mask of the classes its reference labels (all, when it does not say)."""
    return np.asarray(row["labelled"], dtype=bool) if "labelled" in row else np.ones(size, dtype=bool)


def _mean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


def _json(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _check_names(class_names: Iterable[str], expected: int | None) -> list[str]:
    names = list(class_names)
    if expected is not None and len(names) != expected:
        raise ValueError(f"{len(names)} class names for {expected} foreground classes (leave out the background)")
    return names
