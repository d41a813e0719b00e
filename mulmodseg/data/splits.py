"""Train/validation splits, k-fold splits and seeded subsampling (CT:MR ratio control) of case lists.

All functions are pure: the same cases and seed give the same result, in the input order.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, TypeVar

import numpy as np

T = TypeVar("T")


def _case_id(case) -> str:
    return getattr(case, "id", str(case))


def split_cases(cases: Sequence[T], val_fraction: float = 0.2, seed: int = 0,
                val_ids: Optional[Sequence[str]] = None) -> Tuple[List[T], List[T]]:
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


def kfold_split(cases: Sequence[T], k: int, fold: int, seed: int = 0) -> Tuple[List[T], List[T]]:
    """(train, val) for fold `fold` of a seeded k-fold partition; the k validation sets are disjoint
    and cover every case once (fold sizes differ by at most one)."""
    if k < 2 or not 0 <= fold < k:
        raise ValueError(f"need k >= 2 and 0 <= fold < k, got k={k}, fold={fold}")
    if len(cases) < k:
        raise ValueError(f"{len(cases)} cases cannot be split into {k} folds")
    folds = np.array_split(np.random.default_rng(seed).permutation(len(cases)), k)
    chosen = set(folds[fold].tolist())
    return [c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen]


def subsample(cases: Sequence[T], n: int, seed: int = 0) -> List[T]:
    """`n` cases drawn without replacement with `seed` (all of them when there are at most `n`),
    in the input order. Used to set the CT:MR ratio (paper Table 5)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if len(cases) <= n:
        return list(cases)
    chosen = set(np.random.default_rng(seed).choice(len(cases), size=n, replace=False).tolist())
    return [c for i, c in enumerate(cases) if i in chosen]
