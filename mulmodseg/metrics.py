"""Evaluation: per-class Dice of label maps, summaries, CSV/Markdown tables, and model cost.

Dice conventions (background, class 0, is never scored):

- a class absent from both the prediction and the label is *absent*: NaN in arrays, ``absent`` in files,
  and left out of every mean (MONAI's ``DiceMetric`` with ``ignore_empty=True`` gives NaN whenever the
  label lacks the class; here a class predicted but not in the label scores 0, since it is a real error);
- a class present in exactly one of them scores 0.

A *row* is one evaluated case: ``{"case": str, "modality": str, "dice": np.ndarray (C,)}`` with
``C = num_classes - 1`` foreground classes, as returned by :func:`dice_per_class`. A *summary* is what
:func:`summarise` returns for a list of rows.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "dice_per_class",
    "summarise",
    "write_metrics_csv",
    "summary_rows",
    "markdown_table",
    "write_summary_csv",
    "count_parameters",
    "count_flops",
]

ABSENT = "absent"
_CHUNK = 1 << 24  # voxels per bincount pass: bounds the int64 temporaries for 512x512x1000 volumes


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


def summarise(rows: Sequence[dict]) -> dict:
    """Per-class means over cases, ignoring cases where the class is absent.

    Returns ``{"per_class": (C,) float64, NaN for a class absent in every case; "present": (C,) int64,
    cases where the class is present; "mean": float, the mean of the non-NaN per-class means (the
    table's average column); "cases": int}``.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    dice = np.stack([np.asarray(row["dice"], dtype=np.float64) for row in rows])  # (cases, C)
    present = (~np.isnan(dice)).sum(0)
    with np.errstate(invalid="ignore"):
        per_class = np.where(present > 0, np.nansum(dice, 0) / np.maximum(present, 1), np.nan)
    scored = per_class[~np.isnan(per_class)]
    return {
        "per_class": per_class,
        "present": present,
        "mean": float(scored.mean()) if scored.size else math.nan,
        "cases": len(rows),
    }


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[dict], class_names: Sequence[str]) -> None:
    """One line per case: ``case, modality, <Dice per class>, mean`` (mean over the case's present classes).

    class_names: the C foreground names (no background). Absent classes are written as ``absent``.
    """
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        names = _check_names(class_names, len(rows[0]["dice"]) if rows else None)
        writer.writerow(["case", "modality", *names, "mean"])
        for row in rows:
            dice = np.asarray(row["dice"], dtype=np.float64)
            present = dice[~np.isnan(dice)]
            mean = float(present.mean()) if present.size else math.nan
            writer.writerow([row["case"], row["modality"], *(_cell(v, 1.0, 6) for v in dice), _cell(mean, 1.0, 6)])


def summary_rows(settings: dict[str, dict], class_names: Sequence[str]) -> list[list[str]]:
    """The paper's layout as text cells: a header, then one row per setting, one column per organ, then
    ``Average``. Values are Dice in percent with two decimals, ``absent`` where no case had the class.

    settings: setting name (e.g. ``"CT, ALT"``) -> a :func:`summarise` result.
    """
    table = [["Setting", *class_names, "Average"]]
    for name, summary in settings.items():
        per_class = summary["per_class"]
        _check_names(class_names, len(per_class))
        table.append([name, *(_cell(v, 100.0, 2) for v in per_class), _cell(summary["mean"], 100.0, 2)])
    return table


def markdown_table(settings: dict[str, dict], class_names: Sequence[str]) -> str:
    """:func:`summary_rows` as a Markdown table (Dice in %), ending with a newline."""
    header, *body = summary_rows(settings, class_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_summary_csv(path: str | os.PathLike, settings: dict[str, dict], class_names: Sequence[str]) -> None:
    """:func:`summary_rows` written as CSV (the same cells as the Markdown table)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(summary_rows(settings, class_names))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: Sequence[int], **forward_kwargs) -> int:
    """Floating-point operations of one forward pass on a zero input of ``input_shape``, e.g. (1, 1, 96, 96, 96).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: convolutions (incl. transposed), linear
    layers, matrix products and attention, with one multiply-accumulate counted as 2 FLOPs; element-wise
    work (normalisation, activations, bias adds, softmax) is not counted. GFLOPs = result / 1e9. The
    model runs once in eval mode without gradients (so BatchNorm statistics are untouched) and its
    train/eval mode is restored afterwards.
    """
    reference = next(iter(model.parameters()), None)
    x = torch.zeros(
        tuple(input_shape),
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x, **forward_kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _cell(value: float, scale: float, decimals: int) -> str:
    return ABSENT if math.isnan(value) else f"{value * scale:.{decimals}f}"


def _check_names(class_names: Iterable[str], expected: int | None) -> list[str]:
    names = list(class_names)
    if expected is not None and len(names) != expected:
        raise ValueError(f"{len(names)} class names for {expected} foreground classes (leave out the background)")
    return names
