"""The checkpoint file: the contract between training and inference.

One ``torch.save`` dict carries everything ``infer.py`` needs (format version, resolved config with
the model's shape, preprocessing and label map, class and modality names, the embedding table inside
the model state) and, for resuming, the optimizer, scheduler, scaler, counters and RNG states.
Files are written atomically: a temporary file in the same folder, fsync, then ``os.replace``, so a
crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint file that cannot be used, with the file and the reason in the message."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened exclusively, not mkstemp: its files are 0o600, and the checkpoint should get
    # the umask's mode like any file the user makes (a lab shares runs between accounts).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
