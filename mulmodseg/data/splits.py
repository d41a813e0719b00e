"""Train/validation splits, k-fold splits and seeded subsampling (CT:MR ratio control) of case lists.

All functions are pure: the same cases and seed give the same result, in the input order.

Cross-validation splits (``make_folds``, ``fold_problems``) use nnU-Net's ``splits_final.json`` shape once
per modality: ``{"CT": [{"train": [ids], "val": [ids]}, ...one per fold], "MR": [...]}``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def _case_id(case) -> str:
    return getattr(case, "id", str(case))


def split_cases(cases: Sequence[T], val_fraction: float = 0.2, seed: int = 0,
                val_ids: Sequence[str] | None = None) -> tuple[list[T], list[T]]:
    """Split into (train, val): the cases named in `val_ids`, or round(val_fraction * n) drawn with `seed`.

    A fraction > 0 keeps at least one validation and one training case when there are two or more.
    """
    if val_ids is not None:
        wanted = set(val_ids)
        unknown = wanted - {_case_id(c) for c in cases}
        if unknown:
            raise ValueError(f"validation ids not among the cases: {sorted(unknown)}")
        return [c for c in cases if _case_id(c) not in wanted], [c for c in cases if _case_id(c) in wanted]
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(cases)
    n_val = int(np.floor(val_fraction * n + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen]


def kfold_split(cases: Sequence[T], k: int, fold: int, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, val) for fold `fold` of a seeded k-fold partition; the k validation sets are disjoint
    and cover every case once (fold sizes differ by at most one)."""
    if k < 2 or not 0 <= fold < k:
        raise ValueError(f"need k >= 2 and 0 <= fold < k, got k={k}, fold={fold}")
    if len(cases) < k:
        raise ValueError(f"{len(cases)} cases cannot be split into {k} folds")
    folds = np.array_split(np.random.default_rng(seed).permutation(len(cases)), k)
    chosen = set(folds[fold].tolist())
    return [c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen]


Splits = dict[str, list[dict[str, list[str]]]]


def make_folds(ids: Mapping[str, Sequence[str]], k: int, seed: int = 0) -> Splits:
    """{modality: k folds of {"train": ids, "val": ids}}: each modality's ``ids`` partitioned on its own
    by ``kfold_split`` with ``seed`` (so every fold holds about 1/k of each modality's scans)."""
    for name, names in ids.items():
        if len(names) < k:  # kfold_split's own message would not name the modality
            raise ValueError(f"{name}: {len(names)} scan(s) cannot be split into {k} folds")
    return {name: [dict(zip(("train", "val"), kfold_split(list(names), k, fold, seed))) for fold in range(k)]
            for name, names in ids.items()}


def fold_problems(splits: object, ids: Mapping[str, Sequence[str]], where: str) -> list[str]:
    """What is wrong with ``splits`` (read from ``where``) for a run over ``ids`` ({modality: case ids}):
    not the shape of ``make_folds``, a modality missing, folds counts that differ between modalities,
    unknown ids, a scan in both lists of a fold, or in the validation lists of two folds. Empty: usable."""
    if not isinstance(splits, dict) or not all(
            isinstance(folds, list) and folds and all(isinstance(f, dict) and isinstance(f.get("train"), list)
                                                      and isinstance(f.get("val"), list) for f in folds)
            for folds in splits.values()):
        return [f'{where}: expected {{"CT": [{{"train": [ids], "val": [ids]}}, ...one per fold], "MR": ...}}']
    problems = [f"{where}: no folds for {name}" for name in ids if name not in splits]
    counts = {name: len(splits[name]) for name in ids if name in splits}
    if len(set(counts.values())) > 1:
        problems.append(f"{where}: the modalities have different numbers of folds ({counts})")
    for name in counts:
        known, seen = set(ids[name]), {}
        for fold, lists in enumerate(splits[name]):
            unknown = sorted((set(lists["train"]) | set(lists["val"])) - known)
            if unknown:
                problems.append(f"{where}: {name} fold {fold} names {len(unknown)} scan(s) not in the data: "
                                f"{', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}")
            both = sorted(set(lists["train"]) & set(lists["val"]))
            if both:
                problems.append(f"{where}: {name} fold {fold} trains and validates on {', '.join(both[:3])}")
            for case in lists["val"]:
                if case in seen:
                    problems.append(f"{where}: {name} {case} is in the validation lists of folds {seen[case]} "
                                    f"and {fold}; the folds must be disjoint")
                seen.setdefault(case, fold)
    return problems


def subsample(cases: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """`n` cases drawn without replacement with `seed` (all of them when there are at most `n`),
    in the input order. Used to set the CT:MR ratio (paper Table 5)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(cases) <= n:
        return list(cases)
    chosen = set(np.random.default_rng(seed).choice(len(cases), size=n, replace=False).tolist())
    return [c for i, c in enumerate(cases) if i in chosen]
