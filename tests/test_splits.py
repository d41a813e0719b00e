"""mulmodseg.data.splits: train/validation splits, k-fold splits, per-modality folds and their checks, subsampling."""
from pathlib import Path

import pytest

from mulmodseg.data import Case, fold_problems, kfold_split, make_folds, split_cases, subsample


def test_split_cases_fraction_and_explicit():
    cases = [Case(f"c{i}", Path(f"c{i}.nii.gz"), None, "CT") for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=1)
    assert len(train) == 8 and len(val) == 2
    assert sorted(c.id for c in train + val) == sorted(c.id for c in cases)
    assert split_cases(cases, 0.2, seed=1) == (train, val)
    assert any(split_cases(cases, 0.2, seed=s)[1] != val for s in range(2, 6))
    assert len(split_cases(cases[:3], 0.1, seed=0)[1]) == 1
    train, val = split_cases(cases, val_ids=["c3", "c7"])
    assert [c.id for c in val] == ["c3", "c7"] and len(train) == 8
    with pytest.raises(ValueError):
        split_cases(cases, val_ids=["zz"])


def test_kfold_split_two_fold_covers_all_once():
    cases = list(range(21))
    folds = [kfold_split(cases, 2, f, seed=3) for f in range(2)]
    assert sorted(folds[0][1] + folds[1][1]) == cases
    assert not set(folds[0][1]) & set(folds[1][1])
    assert sorted(len(v) for _, v in folds) == [10, 11]
    assert all(sorted(t + v) == cases for t, v in folds)
    assert kfold_split(cases, 2, 0, seed=3) == folds[0]


def test_make_folds_are_seeded_per_modality_disjoint_and_cover_every_scan():
    ids = {"CT": [f"ct{i}" for i in range(7)], "MR": [f"mr{i}" for i in range(3)]}
    folds = make_folds(ids, 3, seed=1)
    assert folds == make_folds(ids, 3, seed=1)  # deterministic
    assert folds != make_folds(ids, 3, seed=2)
    for name, names in ids.items():
        vals = [f["val"] for f in folds[name]]
        assert sorted(sum(vals, [])) == sorted(names)  # each scan validates once
        assert sorted(len(v) for v in vals) == ([2, 2, 3] if name == "CT" else [1, 1, 1])  # stratified: 7 -> 3 2 2
        assert all(sorted(f["train"] + f["val"]) == sorted(names) and not set(f["train"]) & set(f["val"])
                   for f in folds[name])
    # Each modality on its own: the CT folds do not depend on the MR scans.
    assert make_folds({"CT": ids["CT"]}, 3, seed=1)["CT"] == folds["CT"]
    assert fold_problems(folds, ids, "s.json") == []
    with pytest.raises(ValueError, match="MR: 3 scan\\(s\\) cannot be split into 4 folds"):
        make_folds(ids, 4)


def test_fold_problems_names_each_bad_split():
    ids = {"CT": ["a", "b", "c", "d"], "MR": ["x", "y"]}
    bad = {"CT": [{"train": ["a", "b"], "val": ["c", "zz"]}, {"train": ["c", "d"], "val": ["c", "d"]}],
           "PET": [{"train": [], "val": []}]}
    assert fold_problems(bad, ids, "s.json") == [
        "s.json: no folds for MR",
        "s.json: CT fold 0 names 1 scan(s) not in the data: zz",
        "s.json: CT fold 1 trains and validates on c, d",
        "s.json: CT c is in the validation lists of folds 0 and 1; the folds must be disjoint",
    ]
    uneven = {"CT": make_folds(ids, 2)["CT"], "MR": make_folds(ids, 2)["MR"][:1]}
    assert fold_problems(uneven, ids, "s.json") == ["s.json: the modalities have different numbers of folds "
                                                    "({'CT': 2, 'MR': 1})"]
    assert fold_problems([{"train": [], "val": []}], ids, "s.json")[0].startswith("s.json: expected {\"CT\": [")


def test_subsample_ratio_control():
    ct = [f"ct{i:02d}" for i in range(60)]
    mr = [f"mr{i:02d}" for i in range(20)]
    picked = subsample(ct, 2 * len(mr), seed=42)
    assert len(picked) == 40 and set(picked) <= set(ct)
    assert picked == sorted(picked)
    assert subsample(ct, 40, seed=42) == picked and subsample(ct, 40, seed=7) != picked
    assert subsample(mr, 35, seed=0) == mr
