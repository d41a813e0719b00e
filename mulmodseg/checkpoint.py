"""The checkpoint file: the contract between training and inference.

One ``torch.save`` dict carries everything ``infer.py`` needs (format version, resolved config with
the model's shape, preprocessing and label map, class and modality names, the embedding table inside
the model state) and, for resuming, the optimizer, scheduler, scaler, counters and RNG states. It is written
through ``files.atomic_write``, so a crash leaves the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mulmodseg.errors import UserError
from mulmodseg.files import atomic_write

# 2: every training setting saved, and the scans' lists; format 1 files load too (config.saved_config).
FORMAT_VERSION = 2


class CheckpointError(UserError):
    """A checkpoint file that cannot be used, with the file and the reason in the message."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through ``atomic_write``."""
    def write(tmp: Path) -> None:
        # Through a Python file: a full disk is then an OSError (ENOSPC) under torch's RuntimeError, where torch's
        # own file writer says only "unexpected pos".
        with open(tmp, "wb") as file:
            torch.save(obj, file)

    atomic_write(path, write)


def save_checkpoint(path: str | Path, config: dict, model_state: dict, **extra: Any) -> None:
    """Write a versioned checkpoint: ``config`` (JSON-like), ``model`` state dict, and ``extra`` fields."""
    atomic_save({"format_version": FORMAT_VERSION, "config": config, "model": model_state, **extra}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``, or raise ``CheckpointError`` saying why not."""
    path = Path(path)
    if path.is_dir():
        hint = f"; use {path / 'last.pt'}" if (path / "last.pt").is_file() else ""
        raise CheckpointError(f"{path}: a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # Our own files hold RNG states (numpy arrays, tuples), so the restricted unpickler is not enough.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated zip, a text file, ...: name the file, keep the cause
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        hint = " (a reference MulModSeg checkpoint? use mulmodseg.model.load_reference_checkpoint)" if (
            isinstance(ckpt, dict) and "net" in ckpt
        ) else ""
        raise CheckpointError(f"{path}: not a mulmodseg checkpoint{hint}")
    version = ckpt["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer mulmodseg (format {version}; this version reads up to {FORMAT_VERSION})"
        )
    return ckpt


def rng_state() -> dict:
    """Every global generator's state, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (the initial weights)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
