"""On-disk cache of preprocessed volumes (`.npy`, memory-mapped on load).

An entry lives in `<cache_dir>/<key>/` with image.npy, label.npy (when labelled) and meta.json, where
key = sha256 of (format version, modality, settings as sorted JSON, sha256 of the image file, sha256 of
the label file). Changing a file's contents or any setting therefore gives a new entry; stale entries
are never read (delete the folder to reclaim space). Each file of an entry is written whole
(``mulmodseg.files.atomic_write``), meta.json last, and meta.json records each array's byte size, shape
and dtype, so an entry cut short by a crash or a truncated file is detected and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mulmodseg.files import atomic_write

from .cases import Case, DataError
from .labels import parse_label_map
from .preprocess import default_settings, preprocess, resolve_settings

CACHE_VERSION = 1


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class VolumeCache:
    """Preprocessed (image, label, meta) per (case files, settings), computed once and memory-mapped."""

    def __init__(self, cache_dir: os.PathLike):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def key(self, case: Case, settings: dict[str, Any]) -> str:
        """Content- and settings-derived entry name (64 hex characters)."""
        # Resolved settings, so that {} and the spelled-out defaults share an entry.
        resolved = resolve_settings(case.modality, dict(settings))
        if resolved["label_map"] is not None:
            resolved["label_map"] = sorted(parse_label_map(resolved["label_map"]).items())
        parts = {
            "version": CACHE_VERSION,
            "modality": case.modality,
            "settings": resolved,
            "image": file_sha256(Path(case.image)),
            "label": None if case.label is None else file_sha256(Path(case.label)),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def load(self, case: Case, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """(image float32 (X, Y, Z) memmap, label uint8 (X, Y, Z) memmap or None, meta), preprocessing
        with `preprocess(case.image, case.label, case.modality, **settings)` on a miss."""
        entry = self.cache_dir / self.key(case, settings)
        cached = self._read(entry)
        if cached is not None:
            return cached
        image, label, meta = preprocess(case.image, case.label, case.modality, **settings)
        try:
            self._write(entry, image, label, meta)
        except PermissionError as e:  # a shared cache that others fill: reading it needs no write access
            raise DataError(f"{self.cache_dir}: cannot add {case.image} to this cache ({e.strerror}); "
                            "pass a --cache_dir you can write") from e
        cached = self._read(entry)
        if cached is None:
            raise OSError(f"{entry}: cache entry unreadable right after writing it")
        return cached

    @staticmethod
    def _read(entry: Path):
        try:
            record = json.loads((entry / "meta.json").read_text())
            arrays = {}
            for name, spec in record["arrays"].items():
                path = entry / f"{name}.npy"
                if path.stat().st_size != spec["bytes"]:
                    return None
                array = np.load(path, mmap_mode="r")
                if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                    return None
                arrays[name] = array
            return arrays["image"], arrays.get("label"), record["meta"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write(self, entry: Path, image: np.ndarray, label: np.ndarray | None, meta: dict[str, Any]) -> None:
        # meta.json last: an entry without it, or with an array that does not match it (a broken entry, or one
        # that another process is rewriting with the same contents), is not read. The folder gets the umask's
        # mode, so that other accounts can read a shared --cache_dir.
        entry.mkdir(exist_ok=True)
        arrays = {}
        for name, array in (("image", image), ("label", label)):
            if array is None:
                continue
            path = entry / f"{name}.npy"
            atomic_write(path, lambda tmp: np.save(tmp, np.ascontiguousarray(array)))
            arrays[name] = {"bytes": path.stat().st_size, "shape": list(array.shape), "dtype": str(array.dtype)}
        record = json.dumps({"arrays": arrays, "meta": meta})
        atomic_write(entry / "meta.json", lambda tmp: tmp.write_text(record))


def load_training_volumes(cases: Sequence[Case], settings: dict[str, Any] | None = None,
                          cache: VolumeCache | None = None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """[(image, label)] in the training space for each case, through `cache` when given.

    settings: applied to every case; None uses `default_settings(case.modality)` per case.
    """
    volumes = []
    for case in cases:
        case_settings = default_settings(case.modality) if settings is None else settings
        if cache is not None:
            image, label, _ = cache.load(case, case_settings)
        else:
            image, label, _ = preprocess(case.image, case.label, case.modality, **case_settings)
        volumes.append((image, label))
    return volumes
