"""Validation during training: the Dice of a model's sliding-window argmax on preprocessed volumes, and its reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mulmodseg.inferer import sliding_window_inference
from mulmodseg.metrics import dice_per_class, write_reports


@torch.no_grad()
def validate(model: nn.Module, volumes: Sequence[tuple[np.ndarray, np.ndarray]], modality: str, num_classes: int,
             roi_size: Sequence[int], device: torch.device, *, predictor: Callable | None = None,
             sw_batch_size: int = 4, amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Per-case, per-class Dice (cases, K-1) of the sliding-window argmax on each (image (X, Y, Z), label
    (X, Y, Z)) of ``volumes``, in the training space (NaN: a class absent from both). ``predictor`` runs the
    windows (default: ``model``; e.g. the model with its windows laid out as channels_last_3d)."""
    model.eval()
    rows = []
    for image, label in volumes:
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a copy: cached volumes are read-only
        logits = sliding_window_inference(x, roi_size, predictor or model, sw_batch_size=sw_batch_size,
                                          sw_device=device, device="cpu", autocast_dtype=amp_dtype, modality=modality)
        rows.append(dice_per_class(logits.argmax(1)[0].numpy(), np.asarray(label), num_classes))
    model.train()
    return np.array(rows)


def write_validation(folder: Path, rows: list[dict], classes: Sequence[str], modality: str, epoch: int,
                     fold: int | None) -> None:
    """One modality's validation ``rows`` (``metrics.write_reports``' records) as its reports in ``folder``,
    replacing the previous epoch's."""
    folder.mkdir(parents=True, exist_ok=True)
    title = modality if fold is None else f"fold {fold} {modality}"
    write_reports(folder, rows, classes[1:], title, {"epoch": epoch, "fold": fold, "modality": modality,
                                                     "classes": list(classes)},
                  f"Dice of the argmax on the training grid (the preprocessed scans), epoch {epoch}.")
