"""The checkpoint file: the contract between training and inference.

One ``torch.save`` dict carries everything ``infer.py`` needs (format version, resolved config with
the model's shape, preprocessing and label map, class and modality names, the embedding table inside
the model state) and, for resuming, the optimizer, scheduler, scaler, counters and RNG states.
Files are written atomically (``atomic_write``: a temporary file in the same folder, fsync, then
``os.replace``), so a crash leaves either the old file or the new one, never half of one. The core package
writes every file that must be whole through ``atomic_write``: checkpoints, inference outputs, run files and
the preprocessing cache.
"""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mulmodseg.errors import UserError

# 2: every training setting saved, and the scans' lists; format 1 files load too (config.saved_config).
FORMAT_VERSION = 2


class CheckpointError(UserError):
    """A checkpoint file that cannot be used, with the file and the reason in the message."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Make ``path`` whole or not at all: ``write(tmp)`` writes a temporary file beside it, which is synced to
    disk and renamed onto ``path``; on any error (Ctrl-C too) the temporary is removed and ``path`` is as it was.

    ``tmp`` is hidden and ends in ``path``'s own name, so writers that go by the extension (nibabel's
    ``.nii.gz``, numpy's ``.npy`` and ``.npz``) write the same format, and folder listings skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and call, not mkstemp: mkstemp's files are 0o600, and ours should get the umask's mode
    # like any file the user makes (a lab shares runs, outputs and caches between accounts).
    tmp = path.with_name(f".{os.getpid()}.{secrets.token_hex(4)}.{path.name}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through ``atomic_write``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def folder_problem(folder: str | Path, flag: str, writable: bool = True) -> str | None:
    """Why files cannot be written into ``folder`` (None when they can), said about the option ``flag``:
    a file in its place or on its path, or (when ``writable``) a folder, or its nearest existing parent,
    that cannot be written."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag} {folder}: {existing} is a file, not a folder; choose another {flag}"
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {folder}: cannot write in {existing}; choose another {flag}"
    return None


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
