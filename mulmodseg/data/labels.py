"""Label value mapping: datasets whose label values are not 0..K-1 (MMWHS: 205, 420, ...) or that keep
a subset of classes.

A map lists every allowed nonzero source value; 0 always maps to 0 unless listed. A value mapped to 0
drops that class; a value that is not listed is an error (caught by `check_cases` before training),
so a typo in the map cannot silently erase an organ.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import numpy as np

LabelMapSpec = Union[str, Path, Mapping]


def parse_label_map(spec: LabelMapSpec) -> dict[int, int]:
    """{source value: class index} from a dict, a JSON file, a JSON string or "src:dst,src:dst".

    Class indices must be in 0..255 (labels are stored as uint8).
    """
    if isinstance(spec, Mapping):
        raw = dict(spec)
    else:
        text = str(spec).strip()
        if isinstance(spec, Path) or (text.endswith(".json") and Path(text).is_file()):
            text = Path(text).read_text().strip()
        if text.startswith("{"):
            raw = json.loads(text)
        else:
            raw = {}
            for item in filter(None, (s.strip() for s in text.split(","))):
                src, sep, dst = item.partition(":")
                if not sep:
                    raise ValueError(f"label map item {item!r} is not 'src:dst'")
                raw[src] = dst
    mapping = {}
    for src, dst in raw.items():
        s, d = _as_int(src), _as_int(dst)
        if s < 0 or not 0 <= d <= 255:
            raise ValueError(f"label map {src}:{dst}: source must be >= 0 and class in 0..255")
        mapping[s] = d
    return mapping


def _as_int(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"label map value {value!r} is not an integer")
    return int(number)


def label_map_problems(values: Iterable[int], mapping: Mapping[int, int]) -> list[int]:
    """Source values present in the data but absent from the map (0 is always allowed)."""
    return sorted(int(v) for v in values if int(v) != 0 and int(v) not in mapping)


def apply_label_map(label: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Integer label array -> uint8 array of class indices. Raises ValueError on unmapped values."""
    values = np.unique(label)
    missing = label_map_problems(values, mapping)
    if missing:
        raise ValueError(f"label values {missing} are not in the label map")
    table = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        if src < table.size:
            table[src] = dst
    return table[label]

