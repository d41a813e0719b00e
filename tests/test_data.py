"""Tests of mulmodseg.data: discovery, label maps, splits, integrity checks, preprocess/restore, cache,
crop sampling. Synthetic NIfTIs are tiny and written per test; the real sample lives in data/sample."""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mulmodseg.data.cache as cache_module
from mulmodseg.data import (
    Case,
    CropDataset,
    DataError,
    VolumeCache,
    check_cases,
    collate_crops,
    default_settings,
    discover_amos,
    discover_cases,
    discover_modalities,
    fold_problems,
    has_validation_list,
    kfold_split,
    left_right_order,
    load_training_volumes,
    load_volume,
    make_folds,
    parse_label_map,
    preprocess,
    restore,
    restore_argmax,
    split_cases,
    subsample,
    validation_cases,
)
from mulmodseg.text.prompts import resolve_classes

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
MMWHS = {205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}


def write_nifti(path, array, affine=None, dtype=None):
    """Write `array` as NIfTI (.nii or .nii.gz by name); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def with_sform(path, affine):
    """Rewrite the NIfTI at `path` with `affine` as its sform and no qform: nibabel writes no qform for a
    NaN or collapsed affine, so such broken headers are made this way."""
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), str(path))
    assert np.array_equal(nib.load(str(path)).affine, affine, equal_nan=True)


def tiny(value=0, shape=(8, 8, 8), dtype=np.int16):
    return np.full(shape, value, dtype=dtype)


def dice_per_class(a, b):
    return {int(k): 2.0 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
            for k in np.unique(b) if k != 0}


# ---------------------------------------------------------------- discovery

def test_discover_msd_folders_nii_and_niigz_and_test_split(tmp_path):
    for name in ("a.nii.gz", "b.nii"):
        write_nifti(tmp_path / "imagesTr" / name, tiny())
        write_nifti(tmp_path / "labelsTr" / name, tiny(dtype=np.uint8))
    write_nifti(tmp_path / "imagesTs" / "c.nii.gz", tiny())
    train = discover_cases(tmp_path, "CT")
    assert [c.id for c in train] == ["a", "b"]
    assert [c.label.name for c in train] == ["a.nii.gz", "b.nii"]
    assert all(c.modality == "CT" and c.image.is_file() for c in train)
    test = discover_cases(tmp_path, "CT", split="test")
    assert [(c.id, c.label) for c in test] == [("c", None)]


def test_discover_nnunet_channel_suffix_and_missing_label(tmp_path):
    write_nifti(tmp_path / "imagesTr" / "case_001_0000.nii.gz", tiny())
    write_nifti(tmp_path / "labelsTr" / "case_001.nii.gz", tiny(dtype=np.uint8))
    write_nifti(tmp_path / "imagesTr" / "case_002_0000.nii.gz", tiny())
    cases = discover_cases(tmp_path, "MR")
    assert [c.id for c in cases] == ["case_001", "case_002"]
    assert cases[0].image.name == "case_001_0000.nii.gz" and cases[0].label.name == "case_001.nii.gz"
    # The absent label keeps its expected path, so that check_cases reports it.
    assert cases[1].label == tmp_path / "labelsTr" / "case_002.nii.gz" and not cases[1].label.exists()


def test_discover_nnunet_test_folder_and_multichannel(tmp_path):
    write_nifti(tmp_path / "imagesTs" / "p_007_0000.nii.gz", tiny())
    write_nifti(tmp_path / "imagesTs" / "p_008_0000.nii.gz", tiny())
    assert [(c.id, c.label) for c in discover_cases(tmp_path, "CT", "test")] == [("p_007", None), ("p_008", None)]
    write_nifti(tmp_path / "imagesTs" / "p_008_0001.nii.gz", tiny())
    with pytest.raises(DataError, match="multi-channel") as err:
        discover_cases(tmp_path, "CT", "test")
    assert err.value.problems == [f"{tmp_path / 'imagesTs' / 'p_008_0001.nii.gz'}: multi-channel input "
                                  "(nnU-Net channel 0001) is not supported"]


def test_discover_ids_ending_in_four_digits_with_a_missing_label(tmp_path):
    # The labels name ct_0000 in full, so ct_0001 is a case of its own (whose label is missing), not a
    # second channel of "ct".
    for i in range(3):
        write_nifti(tmp_path / "imagesTr" / f"ct_000{i}.nii.gz", tiny())
    for i in (0, 2):
        write_nifti(tmp_path / "labelsTr" / f"ct_000{i}.nii.gz", tiny(dtype=np.uint8))
    cases = discover_cases(tmp_path, "CT")
    assert [c.id for c in cases] == ["ct_0000", "ct_0001", "ct_0002"]
    assert cases[1].label == tmp_path / "labelsTr" / "ct_0001.nii.gz" and not cases[1].label.exists()


def test_discover_msd_datalist(tmp_path):
    for i in (1, 2):
        write_nifti(tmp_path / "imagesTr" / f"s{i}.nii.gz", tiny())
        write_nifti(tmp_path / "labelsTr" / f"s{i}.nii.gz", tiny(dtype=np.uint8))
    write_nifti(tmp_path / "imagesTs" / "s9.nii.gz", tiny())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "training": [{"image": "./imagesTr/s2.nii.gz", "label": "./labelsTr/s2.nii.gz"}],
        "test": ["./imagesTs/s9.nii.gz"]}))
    train = discover_cases(tmp_path, "CT")
    assert [(c.id, c.image, c.label) for c in train] == [
        ("s2", tmp_path / "imagesTr/s2.nii.gz", tmp_path / "labelsTr/s2.nii.gz")]
    assert [(c.id, c.label) for c in discover_cases(tmp_path, "CT", "test")] == [("s9", None)]
    # nnU-Net v1 datalists name "<id>.nii.gz" while the file carries the _0000 channel suffix.
    (tmp_path / "imagesTr" / "s1.nii.gz").rename(tmp_path / "imagesTr" / "s1_0000.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [
        {"image": "./imagesTr/s1.nii.gz", "label": "./labelsTr/s1.nii.gz"}]}))
    assert [(c.id, c.image.name) for c in discover_cases(tmp_path, "CT")] == [("s1", "s1_0000.nii.gz")]


def test_discover_reference_layout(tmp_path):
    for name in ("amos_0001", "amos_0002"):
        write_nifti(tmp_path / f"{name}.nii.gz", tiny())
        write_nifti(tmp_path / f"{name}_gt.nii.gz", tiny(dtype=np.uint8))
    write_nifti(tmp_path / "amos_0003.nii", tiny())
    write_nifti(tmp_path / "amos_0003_gt.nii", tiny(dtype=np.uint8))
    cases = discover_cases(tmp_path, "CT")
    assert [c.id for c in cases] == ["amos_0001", "amos_0002", "amos_0003"]
    assert [c.label.name for c in cases] == ["amos_0001_gt.nii.gz", "amos_0002_gt.nii.gz", "amos_0003_gt.nii"]


def test_discover_amos_splits_by_id(tmp_path):
    ids = ["amos_0001", "amos_0500", "amos_0507", "amos_0600"]
    for i in ids:
        write_nifti(tmp_path / "imagesTr" / f"{i}.nii.gz", tiny())
        write_nifti(tmp_path / "labelsTr" / f"{i}.nii.gz", tiny(dtype=np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "AMOS", "training": [
        {"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in ids]}))
    found = discover_amos(tmp_path)
    assert [c.id for c in found["CT"]] == ["amos_0001", "amos_0500"]
    assert [c.id for c in found["MR"]] == ["amos_0507", "amos_0600"]
    assert {c.modality for c in found["MR"]} == {"MR"}


def test_discover_empty_or_missing_dir_raises(tmp_path):
    with pytest.raises(DataError, match="no train cases") as err:
        discover_cases(tmp_path, "CT")
    assert str(tmp_path) in err.value.problems[0]
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nope", "CT")


def test_discover_says_what_a_folder_without_nifti_holds(tmp_path):
    for i in range(3):
        (tmp_path / "imagesTr" / "series1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imagesTr" / f"IM{i:04d}.dcm").write_bytes(b"DICM")
    (tmp_path / "imagesTr" / "ct.mha").write_bytes(b"ObjectType")
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(DataError) as err:
        discover_cases(tmp_path, "CT")
    assert err.value.problems[0].endswith(
        f"; {tmp_path / 'imagesTr'} holds 3 .dcm files, 1 .mha files, 1 folders, but only .nii and .nii.gz files "
        "are read: convert DICOM series (e.g. with dcm2niix) and .mha/.nrrd files (e.g. with SimpleITK) to NIfTI first")
    with pytest.raises(DataError) as err:  # an empty folder: no hint
        discover_cases(tmp_path / "labelsTr", "CT")
    assert "holds" not in str(err.value)


def test_discover_bundled_sample():
    cases = discover_cases(SAMPLE / "ct", "CT") + discover_cases(SAMPLE / "mr", "MR")
    assert [(c.id, c.modality) for c in cases] == [("ts_ct_001", "CT"), ("ts_mr_001", "MR")]
    assert discover_modalities(SAMPLE) == {"CT": cases[:1], "MR": cases[1:]}
    with pytest.raises(DataError, match="modality_dirs"):
        discover_modalities(SAMPLE / "ct")
    assert check_cases(cases, num_classes=14, modalities=("CT", "MR")) == []


# ---------------------------------------------------------------- label maps

def test_parse_label_map_all_spellings(tmp_path):
    text = "205:1,420:2,500:3,550:4,600:5,820:6,850:7"
    (tmp_path / "map.json").write_text(json.dumps({str(k): v for k, v in MMWHS.items()}))
    assert parse_label_map(text) == MMWHS
    assert parse_label_map(json.dumps(MMWHS)) == MMWHS
    assert parse_label_map(tmp_path / "map.json") == MMWHS
    assert parse_label_map(str(tmp_path / "map.json")) == MMWHS
    assert parse_label_map({"205": "1"}) == {205: 1}
    with pytest.raises(ValueError):
        parse_label_map("205-1")
    with pytest.raises(ValueError):
        parse_label_map("205:300")


def test_label_map_mmwhs_values_through_preprocess(tmp_path):
    values = np.array([0, 205, 420, 500, 550, 600, 820, 850])
    lab = np.zeros((16, 16, 16), dtype=np.int16)
    for k, v in enumerate(values):
        lab[2 * k:2 * k + 2, 4:12, 4:12] = v
    img = write_nifti(tmp_path / "img.nii.gz", tiny(100, lab.shape), np.diag([1.5, 1.5, 2.0, 1]))
    lbl = write_nifti(tmp_path / "lab.nii.gz", lab, np.diag([1.5, 1.5, 2.0, 1]))
    _, out, meta = preprocess(img, lbl, "CT", label_map="205:1,420:2,500:3,550:4,600:5,820:6,850:7",
                              crop_foreground=False, min_size=None)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 16)
    np.testing.assert_array_equal(out[::2, 8, 8], np.arange(8))
    assert meta["label_map"][0] == [205, 1]
    # A class mapped to 0 is dropped; an unlisted value is an error naming the file.
    _, out, _ = preprocess(img, lbl, "CT", label_map={**MMWHS, 850: 0}, crop_foreground=False, min_size=None)
    assert out.max() == 6 and np.sum(out == 0) == np.sum((lab == 0) | (lab == 850))
    with pytest.raises(DataError, match=r"\[850\]") as err:
        preprocess(img, lbl, "CT", label_map={k: v for k, v in MMWHS.items() if k != 850})
    assert str(lbl) in err.value.problems[0]


# ---------------------------------------------------------------- splits

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


def test_a_datalists_validation_list(tmp_path):
    assert not has_validation_list(tmp_path) and validation_cases(tmp_path, "CT") == []
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a_gt.nii.gz"}],
                                                       "validation": [{"image": "v.nii.gz", "label": "v_gt.nii.gz"}]}))
    assert has_validation_list(tmp_path)
    assert [(c.id, c.label.name) for c in validation_cases(tmp_path, "MR")] == [("v", "v_gt.nii.gz")]
    (tmp_path / "dataset.json").write_text("{not json")
    assert not has_validation_list(tmp_path)  # discovery reports the broken file


def test_subsample_ratio_control():
    ct = [f"ct{i:02d}" for i in range(60)]
    mr = [f"mr{i:02d}" for i in range(20)]
    picked = subsample(ct, 2 * len(mr), seed=42)
    assert len(picked) == 40 and set(picked) <= set(ct)
    assert picked == sorted(picked)
    assert subsample(ct, 40, seed=42) == picked and subsample(ct, 40, seed=7) != picked
    assert subsample(mr, 35, seed=0) == mr


# ---------------------------------------------------------------- integrity checks

def test_check_cases_reports_every_problem_in_one_error(tmp_path):
    good_img = tiny(5)
    good_img[0, 0, 0] = -1000  # air, as in every CT
    good_lab = tiny(1, dtype=np.uint8)
    cases, expected = [], {}

    def case(name, img=good_img, lab=good_lab, modality="CT", affine=None, lab_affine=None, ext=".nii.gz"):
        image = tmp_path / f"{name}{ext}"
        label = tmp_path / f"{name}_gt{ext}"
        if img is not None:
            write_nifti(image, img, affine)
        if lab is not None:
            write_nifti(label, lab, lab_affine if lab_affine is not None else affine)
        cases.append(Case(name, image, label, modality))
        return image, label

    img, lab = case("missing_label", lab=None)
    expected["missing_label"] = (lab, "missing label")
    img, lab = case("missing_image", img=None)
    expected["missing_image"] = (img, "missing image")
    img, lab = case("truncated", img=np.random.default_rng(0).integers(0, 999, (8, 8, 8)).astype(np.int16))
    blob = img.read_bytes()
    img.write_bytes(blob[: len(blob) // 2])
    expected["truncated"] = (img, "truncated")
    img, lab = case("garbage")
    lab.write_bytes(b"this is not a nifti file")
    expected["garbage"] = (lab, "unreadable or truncated label")
    img, lab = case("shape", lab=tiny(1, (8, 8, 7), np.uint8))
    expected["shape"] = (lab, "shape (8, 8, 7) differs")
    img, lab = case("float_label", lab=np.full((8, 8, 8), 1.5, np.float32))
    expected["float_label"] = (lab, "not integers")
    img, lab = case("unmapped", lab=tiny(205, dtype=np.int16) * np.eye(8, dtype=np.int16)[:, :, None] + 3)
    expected["unmapped"] = (lab, "[3, 208] are not in the label map")
    img, lab = case("too_many_classes", lab=tiny(420, dtype=np.int16))
    expected["too_many_classes"] = (lab, "[2] >= num_classes=2")
    nan_img = tiny(0, dtype=np.float32)
    nan_img[1, 2, 3], nan_img[0, 0, 0] = np.nan, np.inf
    img, lab = case("nan", img=nan_img)
    expected["nan"] = (img, "2 NaN/Inf voxels")
    img, lab = case("flat", img=np.zeros((8, 8), np.int16), lab=np.zeros((8, 8), np.uint8))
    expected["flat"] = (img, "is 2D")
    img, lab = case("four_d", img=np.zeros((8, 8, 8, 2), np.int16))
    expected["four_d"] = (img, "is 4D")
    img, lab = case("pet", modality="PET", ext=".nii")
    expected["pet"] = (img, "unknown modality 'PET'")
    img, lab = case("rgb", img=np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))
    expected["rgb"] = (img, "voxels are of type")
    img, lab = case("collapsed")
    with_sform(img, np.diag([1.0, 1.0, 0.0, 1.0]))
    expected["collapsed"] = (img, "affine is degenerate")
    nan_affine = np.eye(4)
    nan_affine[0, 0] = np.nan
    img, lab = case("nan_affine")
    with_sform(img, nan_affine)
    expected["nan_affine"] = (img, "affine has NaN or infinite entries")
    drift = np.eye(4)
    drift[0, 3] = 0.5
    img, lab = case("drift", lab_affine=drift)  # warning only
    img, lab = case("label_nan_affine")  # warning only: voxels correspond
    with_sform(lab, nan_affine)

    label_map = {205: 1, 420: 2, 1: 1}
    with pytest.raises(DataError) as err:
        check_cases(cases, label_map=label_map, num_classes=2, modalities=("CT", "MR"))
    problems = err.value.problems
    assert len(problems) == len(expected) + 1  # flat: image and label are both 2D
    for name, (path, text) in expected.items():
        hits = [p for p in problems if p.startswith(f"{path}:") and text in p]
        assert len(hits) == 1, (name, text, problems)
    assert f"{len(problems)} data problem(s)" in str(err.value)

    good = [c for c in cases if c.id in ("drift", "pet", "label_nan_affine")]
    warnings = check_cases(good, label_map=label_map, num_classes=2)
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{tmp_path / 'drift_gt.nii.gz'}: affine differs from the image's by up to 0.5")
    assert warnings[1] == (f"{tmp_path / 'label_nan_affine_gt.nii.gz'}: its affine has NaN or infinite entries; "
                           f"its voxels are taken to be the image's ({tmp_path / 'label_nan_affine.nii.gz'})")
    assert check_cases(good, label_map=label_map, affine_tol=1.0) == warnings[1:]


def test_swapped_modalities_and_images_given_as_labels_are_named(tmp_path):
    ct, mr = discover_cases(SAMPLE / "ct", "CT"), discover_cases(SAMPLE / "mr", "MR")
    assert check_cases(ct + mr) == []
    as_mr = [Case(c.id, c.image, c.label, "MR") for c in ct]
    as_ct = [Case(c.id, c.image, c.label, "CT") for c in mr]
    assert check_cases(as_mr + as_ct) == [
        f"{ct[0].image}: given as MR, but it has values down to -1207, like the air of a CT in HU; is it a CT "
        "(swapped --ct_dir/--mr_dir, or the wrong --modality)?",
        f"{mr[0].image}: given as CT, but its lowest value is -47, where a CT in HU has air near -1000; is it an MR "
        "(swapped --ct_dir/--mr_dir, or the wrong --modality)?",
    ]
    # The CT as its own label: one short line, not thousands of values.
    with pytest.raises(DataError) as err:
        check_cases([Case("swapped", ct[0].image, ct[0].image, "CT")], num_classes=14)
    (problem,) = err.value.problems
    assert problem.startswith(f"{ct[0].image}: label values ") and len(problem) < 400
    assert " values from -1207 to " in problem and "is it an image rather than a label map?" in problem


def test_check_cases_reads_scaled_images_as_stored(tmp_path, monkeypatch):
    # CT files often carry scl_inter -1024: the check reads the stored int16 voxels, not float64 copies.
    scaled = nib.Nifti1Image(np.arange(512, dtype=np.int16).reshape(8, 8, 8), np.eye(4))
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, tmp_path / "ct.nii.gz")
    floats = np.ones((8, 8, 8), np.float32)
    floats[1, 2, 3] = np.nan
    with_nan = nib.Nifti1Image(floats, np.eye(4))
    with_nan.header.set_slope_inter(2.0, 1.0)
    nib.save(with_nan, tmp_path / "nan.nii.gz")
    read = []
    original = nib.arrayproxy.ArrayProxy.get_unscaled
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", lambda self: read.append(original(self)) or read[-1])
    assert check_cases([Case("ct", tmp_path / "ct.nii.gz", None, "CT")]) == []
    assert read[0].dtype == np.int16
    with pytest.raises(DataError, match="1 NaN/Inf voxels in the image"):
        check_cases([Case("nan", tmp_path / "nan.nii.gz", None, "CT")])
    # Finite stored values that the header's scaling takes beyond float32 (preprocessing's type).
    huge = nib.Nifti1Image(np.full((8, 8, 8), 1e5, np.float64), np.eye(4))
    huge.header.set_slope_inter(1e36, 0.0)
    nib.save(huge, tmp_path / "huge.nii.gz")
    with pytest.raises(DataError, match=r"huge.nii.gz: values reach 1e\+41..1e\+41 after the header's scaling"):
        check_cases([Case("huge", tmp_path / "huge.nii.gz", None, "CT")])


def test_a_label_stored_in_another_axis_order_lands_on_its_image(tmp_path):
    """The bundled CT's label saved as I, R, P (axes permuted and flipped, same world content) gives
    the training label of the label saved like its image, passes the check without a warning, and the
    shape check compares the label on the image's axes."""
    ct = nib.load(str(SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz"))
    lab = nib.load(str(SAMPLE / "ct" / "labelsTr" / "ts_ct_001.nii.gz"))
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(lab.affine),
                                                [[2, -1], [0, 1], [1, -1]])
    moved = lab.as_reoriented(transform)
    assert nib.aff2axcodes(moved.affine) == ("I", "R", "P") and moved.shape == (112, 122, 101)
    nib.save(moved, str(tmp_path / "irp.nii.gz"))
    _, expected, _ = preprocess(ct, lab, "CT")
    _, got, _ = preprocess(ct, tmp_path / "irp.nii.gz", "CT")
    assert np.array_equal(got, expected) and expected.max() == 13
    assert check_cases([Case("ts_ct_001", SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz",
                             tmp_path / "irp.nii.gz", "CT")], num_classes=14) == []
    # Same axes as the image, wrong shape: still a shape problem, named with the label's file.
    write_nifti(tmp_path / "short.nii.gz", np.zeros((122, 101, 111), np.uint8), ct.affine)
    with pytest.raises(DataError, match=r"short.nii.gz: label shape \(122, 101, 111\) differs from image shape"):
        check_cases([Case("x", SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz", tmp_path / "short.nii.gz", "CT")])


def test_preprocess_names_the_file_for_unreadable_input_and_a_degenerate_affine(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file")
    with pytest.raises(DataError, match=f"{garbage}: unreadable"):
        preprocess(garbage, modality="CT")
    noise = np.random.default_rng(0).integers(0, 999, (16, 16, 16)).astype(np.int16)
    truncated = write_nifti(tmp_path / "truncated.nii.gz", noise)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{truncated}: unreadable or truncated data"):
        preprocess(truncated, modality="CT")
    flat = write_nifti(tmp_path / "flat.nii.gz", tiny(5))
    with_sform(flat, np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(DataError, match=f"{flat}: its affine is degenerate"):
        preprocess(flat, modality="CT")


def test_check_cases_duplicates_and_required_labels(tmp_path):
    img = write_nifti(tmp_path / "x.nii.gz", tiny())
    cases = [Case("x", img, None, "CT"), Case("x", img, None, "CT")]
    with pytest.raises(DataError) as err:
        check_cases(cases, require_labels=True)
    assert sum("duplicate case id 'x'" in p for p in err.value.problems) == 2
    assert sum("no label file" in p for p in err.value.problems) == 2
    with pytest.raises(DataError, match="no cases"):
        check_cases([])


# ---------------------------------------------------------------- preprocess / restore

@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_real_round_trip_dice(modality):
    folder = SAMPLE / modality.lower()
    case = discover_cases(folder, modality)[0]
    original = np.asanyarray(nib.load(str(case.label)).dataobj)
    image, label, meta = preprocess(case.image, case.label, modality)
    assert json.loads(json.dumps(meta)) == meta
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
    assert all(n >= 96 for n in image.shape)
    assert image.min() == 0.0 and image.max() == 1.0
    np.testing.assert_allclose(meta["spacing"], [1.5, 1.5, 2.0], rtol=1e-6)
    affine = np.asarray(meta["affine"])
    np.testing.assert_allclose(np.abs(affine[:3, :3]), np.diag([1.5, 1.5, 2.0]), atol=1e-6)
    assert np.all(np.diag(affine)[:3] > 0)  # RAS array order
    assert sorted(np.unique(label)) == sorted(np.unique(original))

    back = restore(label, meta)
    assert back.shape == original.shape and back.dtype == np.uint8
    dice = dice_per_class(back, original)
    assert len(dice) == 12 and min(dice.values()) >= 0.95
    assert np.mean(back == original) == 1.0  # the training grid is finer: nearest round trip is exact

    classes = [0, 1, 2, 6, 10]  # background, spleen, right kidney, liver, pancreas
    onehot = np.stack([label == k for k in classes]).astype(np.float32)
    probs = restore(onehot, meta, "linear")
    assert probs.shape == (len(classes),) + original.shape and probs.dtype == np.float32
    predicted = np.asarray(classes)[probs.argmax(0)]
    masked = np.where(np.isin(original, classes), original, 0)
    assert min(dice_per_class(predicted, masked).values()) >= 0.95
    # Channel by channel with a running argmax: the same labels.
    labels = restore_argmax(onehot, meta)
    assert labels.dtype == np.uint8 and np.array_equal(np.asarray(classes)[labels], predicted)

    # Same image without a label: same array (labels lie inside the body box here).
    alone, none, meta_alone = preprocess(case.image, modality=modality)
    assert none is None and np.array_equal(alone, image)


@pytest.mark.parametrize("radius,nearest_at_most,scores_at_least", [(4.0, 0.87, 0.935), (6.0, 0.91, 0.965),
                                                                     (10.0, 0.95, 0.99)])
def test_restoring_scores_keeps_small_structures(tmp_path, radius, nearest_at_most, scores_at_least):
    """A sphere on a 0.75 x 0.75 x 3 mm scan, trained at 1.5 x 1.5 x 2 mm, with perfect scores there (the
    signed distance to its surface): the argmax of the linearly restored scores is nearly the sphere,
    the nearest-neighbour restored training-space label is blocky (the old path)."""
    shape, spacing = (64, 64, 16), (0.75, 0.75, 3.0)
    centre = np.array([24.2, 23.9, 24.1])  # mm, off the voxel grids
    affine = np.diag([*spacing, 1.0])
    world = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    truth = (np.linalg.norm(world - centre, axis=-1) < radius).astype(np.uint8)
    path = write_nifti(tmp_path / "scan.nii.gz", np.full(shape, 100, np.int16), affine)
    _, _, meta = preprocess(path, modality="MR", spacing=[1.5, 1.5, 2.0], min_size=None, crop_foreground=False)
    train_affine = np.asarray(meta["affine"])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in meta["shape"]], indexing="ij"), -1)
    train_world = grid @ train_affine[:3, :3].T + train_affine[:3, 3]
    inside = radius - np.linalg.norm(train_world - centre, axis=-1)  # > 0 inside the sphere
    scores = np.stack([np.zeros_like(inside), inside]).astype(np.float32)
    from_scores = restore_argmax(scores, meta)
    from_label = restore((inside > 0).astype(np.uint8), meta)
    assert dice_per_class(from_label, truth)[1] <= nearest_at_most
    assert dice_per_class(from_scores, truth)[1] >= scores_at_least


def test_restore_argmax_in_slabs_equals_the_argmax_of_restored_channels():
    rng = np.random.default_rng(0)
    data = np.zeros((30, 26, 12), np.float32)
    data[4:25, 3:20, 2:11] = rng.random((21, 17, 9)) + 1  # a foreground box: voxels outside it are background
    affine = np.array([[0, -1.1, 0, 5], [-0.8, 0, 0, 3], [0, 0, 3.0, -7], [0, 0, 0, 1]])  # not RAS, anisotropic
    meta = preprocess(nib.Nifti1Image(data, affine), modality="MR", spacing=[1.3, 0.9, 2.5], min_size=[20, 20, 20])[2]
    scores = rng.random((4, *meta["shape"])).astype(np.float32)
    expected = restore(scores, meta, "linear", fill=-1.0)
    expected[0][expected[0] == -1.0] = 2.0  # outside the crop box: background
    expected = expected.argmax(0)
    for planes in (1, 5, 16, 1000):
        assert np.array_equal(restore_argmax(scores, meta, planes=planes), expected)


def test_ct_window_values_and_mr_percentiles(tmp_path):
    hu = np.array([-1000, -125, 75, 275, 1000], dtype=np.int16)
    ct = write_nifti(tmp_path / "ct.nii.gz", np.broadcast_to(hu[:, None, None], (5, 4, 4)), np.diag([1.5, 1.5, 2, 1]))
    image, _, meta = preprocess(ct, modality="CT", crop_foreground=False, min_size=None)
    np.testing.assert_allclose(image[:, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert meta["intensity"]["clip"] == [-125.0, 275.0]
    rng = np.random.default_rng(0)
    mr = write_nifti(tmp_path / "mr.nii.gz", rng.normal(300, 50, (30, 30, 20)).astype(np.float32),
                     np.diag([1.5, 1.5, 2, 1]))
    image, _, meta = preprocess(mr, modality="MR", crop_foreground=False, min_size=None)
    assert image.min() == 0.0 and image.max() == 1.0
    assert 0.004 <= np.mean(image == 0.0) <= 0.006 and 0.004 <= np.mean(image == 1.0) <= 0.006
    low, high = meta["intensity"]["clip"]
    assert 150 < low < 200 and 400 < high < 450
    # Any other modality follows MR; a window overrides the percentiles.
    assert default_settings("PET")["percentiles"] == [0.5, 99.5] and default_settings("PET")["window"] is None
    image, _, meta = preprocess(mr, modality="MR", window=(0, 600), crop_foreground=False, min_size=None)
    assert meta["intensity"]["clip"] == [0.0, 600.0]
    with pytest.raises(TypeError, match="unknown preprocessing settings"):
        preprocess(mr, modality="MR", spacng=(1, 1, 1))


def _axcode_affine(codes, spacing, shape):
    """Affine whose axes run along `codes` (e.g. "LPS"), with some world offset."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for axis, code in enumerate(codes):
        world = "RAS".index(code) if code in "RAS" else "LPI".index(code)
        sign = 1 if code in "RAS" else -1
        affine[world, axis] = sign * spacing[axis]
        affine[world, 3] = -sign * spacing[axis] * (shape[axis] - 1) / 3 + 10 * world
    return affine


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "SLP"])
@pytest.mark.parametrize("at_target", [True, False])
def test_orientation_marker_keeps_world_position(tmp_path, codes, at_target):
    shape = (20, 14, 10)
    # at_target: R/L and A/P axes 1.5 mm, S/I 2.0 mm, so only flips, transposes, crop and pad happen.
    spacing = [2.0 if c in "SI" else 1.5 for c in codes] if at_target else [3.0, 3.0, 3.0]
    affine = _axcode_affine(codes, spacing, shape)
    assert "".join(nib.aff2axcodes(affine)) == codes
    img = np.full(shape, 100, np.int16)
    img[:2], img[-2:] = -1000, -1000  # air slabs on one axis: the crop must cut them
    lab = np.zeros(shape, np.uint8)
    marker = (5, 9, 3)
    lab[marker] = 1
    image_path = write_nifti(tmp_path / "img.nii.gz", img, affine)
    label_path = write_nifti(tmp_path / "lab.nii.gz", lab, affine)
    image, label, meta = preprocess(image_path, label_path, "CT", min_size=(16, 16, 16))
    train_affine = np.asarray(meta["affine"])
    assert "".join(nib.aff2axcodes(train_affine)) == "RAS"
    world = affine @ np.r_[marker, 1.0]
    hits = np.argwhere(label == 1)
    found = (train_affine @ np.c_[hits, np.ones(len(hits))].T).T[:, :3].mean(axis=0)
    if at_target:
        assert len(hits) == 1
        np.testing.assert_allclose(found, world[:3], atol=1e-9)
    else:  # 3 mm -> 1.5 x 1.5 x 2 mm: the marker spreads over 2 x 2 x 1-2 voxels around the same point
        assert 4 <= len(hits) <= 8
        assert np.all(np.abs(found - world[:3]) <= 0.5 * np.array([1.5, 1.5, 2.0]) + 1e-9)
    cropped = np.array(meta["crop_end"]) - np.array(meta["crop_start"])
    assert np.prod(cropped) < np.prod(meta["resampled_shape"])  # the air slabs were cropped away
    back = restore(label, meta)
    assert back.shape == shape
    assert np.argwhere(back == 1).tolist() == [list(marker)]
    restored_image = restore(image, meta, "linear")
    # (100 + 125) / 400 away from the air; body voxels next to it mix in some air (HU resampled, then windowed)
    np.testing.assert_allclose(restored_image[3:-3], 0.5625, atol=1e-6)
    assert np.all((restored_image[2:-2] > 0.2) & (restored_image[2:-2] <= 0.5625 + 1e-6))
    assert np.all(restored_image[img == -1000] == 0.0)


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "permuted"])
def test_resample_equals_map_coordinates_in_any_memory_layout(layout):
    from scipy.ndimage import map_coordinates

    from mulmodseg.data.geometry import resample
    rng = np.random.default_rng(0)
    array = rng.random((20, 15, 10)).astype(np.float32)
    positions = [np.sort(rng.uniform(0, n - 1, m)) for n, m in ((20, 13), (15, 22), (10, 7))]
    ref_linear = map_coordinates(array.astype(np.float64), np.meshgrid(*positions, indexing="ij"), order=1)
    ref_nearest = array[np.ix_(*[np.floor(p + 0.5).astype(int) for p in positions])]
    stored = {"C": array, "F": np.asfortranarray(array), "flipped": array[::-1, ::-1].copy()[::-1, ::-1],
              "permuted": array.transpose(2, 0, 1).copy().transpose(1, 2, 0)}[layout]
    np.testing.assert_allclose(resample(stored, positions, 1), ref_linear, atol=1e-6)
    np.testing.assert_array_equal(resample(stored, positions, 0), ref_nearest)
    np.testing.assert_array_equal(resample(stored, positions, 1), resample(array, positions, 1))


def test_preprocess_rejects_4d_and_restore_checks_shape(tmp_path):
    path = write_nifti(tmp_path / "x.nii.gz", np.zeros((8, 8, 8, 2), np.int16))
    with pytest.raises(DataError, match="expected a 3D volume") as err:
        preprocess(path)
    assert str(path) in err.value.problems[0]
    good = write_nifti(tmp_path / "y.nii.gz", tiny(100))
    _, _, meta = preprocess(good, min_size=None)
    with pytest.raises(ValueError):
        restore(np.zeros((3, 3, 3)), meta)


def test_a_trailing_axis_of_length_one_is_a_3d_volume(tmp_path):
    # (X, Y, Z, 1) files (a time or channel axis of one) are what some exporters write; ITK reads them
    # as 3D, and so do the checks, preprocess and read_label, with the same numbers as the 3D file.
    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 300, (12, 10, 8)).astype(np.int16)
    label = (rng.random((12, 10, 8)) > 0.7).astype(np.uint8)
    affine = np.array([[-2.0, 0, 0, 10], [0, 0, 3.0, -5], [0, 2.5, 0, 7], [0, 0, 0, 1]])
    flat = Case("a", write_nifti(tmp_path / "3d" / "a.nii.gz", image, affine),
                write_nifti(tmp_path / "3d" / "a_gt.nii.gz", label, affine), "CT")
    extra = Case("a", write_nifti(tmp_path / "4d" / "a.nii.gz", image[..., None], affine),
                 write_nifti(tmp_path / "4d" / "a_gt.nii.gz", label[..., None, None], affine), "CT")
    assert check_cases([extra]) == []
    loaded = load_volume(extra.image)
    assert loaded.shape == (12, 10, 8) and np.array_equal(loaded.affine, affine)
    assert np.array_equal(np.asanyarray(loaded.dataobj), image)
    want_image, want_label, want_meta = preprocess(flat.image, flat.label, min_size=[8, 8, 8])
    got_image, got_label, got_meta = preprocess(extra.image, extra.label, min_size=[8, 8, 8])
    assert np.array_equal(got_image, want_image) and np.array_equal(got_label, want_label)
    assert got_meta["original_shape"] == [12, 10, 8] and got_meta["shape"] == want_meta["shape"]
    with pytest.raises(DataError, match="is 4D"):
        check_cases([Case("b", write_nifti(tmp_path / "b.nii.gz", np.zeros((8, 8, 8, 2), np.int16)), None, "CT")])


# ---------------------------------------------------------------- cache

SMALL = {"min_size": [8, 8, 8]}


def _counting_preprocess(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        return preprocess(*args, **kwargs)
    monkeypatch.setattr(cache_module, "preprocess", counted)
    return calls


def _small_case(tmp_path, value=100):
    rng = np.random.default_rng(value)
    img = write_nifti(tmp_path / "src" / "a.nii.gz", rng.integers(-200, 300, (12, 10, 8)).astype(np.int16),
                      np.diag([3.0, 3.0, 3.0, 1]))
    lab = write_nifti(tmp_path / "src" / "a_gt.nii.gz", (rng.random((12, 10, 8)) > 0.7).astype(np.uint8),
                      np.diag([3.0, 3.0, 3.0, 1]))
    return Case("a", img, lab, "CT")


def test_cache_hit_invalidation_and_recovery(tmp_path, monkeypatch):
    calls = _counting_preprocess(monkeypatch)
    case = _small_case(tmp_path)
    cache = VolumeCache(tmp_path / "cache")
    old_umask = os.umask(0o022)
    try:
        image, label, meta = cache.load(case, SMALL)
    finally:
        os.umask(old_umask)
    entry = tmp_path / "cache" / cache.key(case, SMALL)
    assert entry.stat().st_mode & 0o777 == 0o755  # a shared --cache_dir: others can read the entry
    expected_image, expected_label, expected_meta = preprocess(case.image, case.label, "CT", **SMALL)
    assert len(calls) == 1 and isinstance(image, np.memmap) and isinstance(label, np.memmap)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert meta == expected_meta

    again = cache.load(case, dict(SMALL))
    assert len(calls) == 1 and np.array_equal(again[0], image) and again[2] == meta
    assert cache.load(case, {**default_settings("CT"), **SMALL})[2] == meta and len(calls) == 1

    cache.load(case, {**SMALL, "spacing": [3.0, 3.0, 3.0]})  # changed setting -> new entry
    assert len(calls) == 2
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2 and not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]

    _small_case(tmp_path, value=7)  # same paths, new contents -> new entry
    changed = cache.load(case, SMALL)
    assert len(calls) == 3 and not np.array_equal(changed[0], image)
    expected_changed = np.array(changed[0])  # a copy: the test truncates the mapped file in place

    entry = tmp_path / "cache" / cache.key(case, SMALL)
    npy = entry / "image.npy"
    npy.write_bytes(npy.read_bytes()[:-100])  # truncated by a crash or a full disk
    recovered = cache.load(case, SMALL)
    assert len(calls) == 4 and np.array_equal(recovered[0], expected_changed)
    (entry / "meta.json").write_text('{"arrays": {"image"')  # half-written meta
    assert np.array_equal(cache.load(case, SMALL)[0], expected_changed) and len(calls) == 5
    (entry / "meta.json").unlink()
    assert np.array_equal(cache.load(case, SMALL)[0], expected_changed) and len(calls) == 6
    assert len(cache.load(case, SMALL)) == 3 and len(calls) == 6


def test_load_training_volumes_through_cache(tmp_path, monkeypatch):
    calls = _counting_preprocess(monkeypatch)
    case = _small_case(tmp_path)
    unlabelled = Case("b", case.image, None, "MR")
    cache = VolumeCache(tmp_path / "cache")
    volumes = load_training_volumes([case, unlabelled], SMALL, cache)
    assert len(calls) == 2 and volumes[1][1] is None
    assert volumes[0][0].dtype == np.float32 and volumes[0][1].dtype == np.uint8
    again = load_training_volumes([case, unlabelled], SMALL, cache)
    assert len(calls) == 2 and np.array_equal(again[0][0], volumes[0][0])
    direct = load_training_volumes([case], SMALL, None)
    assert np.array_equal(direct[0][1], volumes[0][1])
    defaults = load_training_volumes([case], None, None)  # default_settings per modality: padded to 96^3
    assert defaults[0][0].shape == (96, 96, 96)


# ---------------------------------------------------------------- sampling

def _block_volume(size=40, lo=17, hi=23):
    image = np.ones((size,) * 3, np.float32)
    label = np.zeros((size,) * 3, np.uint8)
    label[lo:hi, lo:hi, lo:hi] = 3
    return image, label


def test_crop_positive_ratio_over_many_draws():
    ds = CropDataset([_block_volume()], roi_size=(8, 8, 8), num_samples=4, aug_prob=0.0, seed=5)
    centre_labels, flags = [], []
    for epoch in range(300):
        ds.set_epoch(epoch)
        item = ds[0]
        centre_labels += item["label"][:, 0, 4, 4, 4].tolist()
        flags += ds.draw_centres(0, ds.generator(0))[1].tolist()
    positive = np.mean(np.array(centre_labels) > 0)
    assert abs(positive - 0.5) < 0.05
    assert np.array_equal(np.array(centre_labels) > 0, np.array(flags))
    only_pos = CropDataset([_block_volume()], (8, 8, 8), num_samples=16, pos_fraction=1.0, aug_prob=0.0)
    assert np.all(only_pos[0]["label"][:, 0, 4, 4, 4].numpy() == 3)
    image, label = _block_volume()
    image[:, :, 30:] = 0  # not foreground: never a negative centre
    only_neg = CropDataset([(image, label)], (8, 8, 8), num_samples=64, pos_fraction=0.0)
    centres, positive_flags = only_neg.draw_centres(0, only_neg.generator(0))
    assert not positive_flags.any() and centres[:, 2].max() < 30
    assert np.all(label[tuple(centres.T)] == 0)


def test_class_balanced_centres_show_a_small_organ_as_often_as_a_large_one():
    """A 1000-voxel organ beside an 8-voxel one: uniform labelled voxels centre 8/1008 of the positive
    crops on the small one; class-balanced centres half of them."""
    image = np.ones((40, 40, 40), np.float32)
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:15, 5:15, 5:15] = 6
    label[30:32, 30:32, 30:32] = 11
    shares = {}
    for centres in ("voxel", "class"):
        ds = CropDataset([(image, label)], (8, 8, 8), num_samples=50, pos_fraction=1.0, positive_centres=centres)
        hits = []
        for epoch in range(40):
            ds.set_epoch(epoch)
            picked, _ = ds.draw_centres(0, ds.generator(0))
            hits += label[tuple(picked.T)].tolist()
        assert set(hits) <= {6, 11}  # every positive centre is a labelled voxel
        shares[centres] = np.mean(np.array(hits) == 11)
    assert shares["voxel"] < 0.03
    assert abs(shares["class"] - 0.5) < 0.05
    with pytest.raises(ValueError, match="positive_centres"):
        CropDataset([(image, label)], positive_centres="organ")
    empty = CropDataset([(image, np.zeros_like(label))], (8, 8, 8), num_samples=3, positive_centres="class")
    assert not empty.draw_centres(0, empty.generator(0))[1].any()  # no labelled voxel: negatives, no error


def test_left_right_order_pairs_names_that_differ_by_the_side():
    amos = resolve_classes("amos")
    order = left_right_order(amos)
    assert [(amos[k], amos[order[k]]) for k in range(len(amos)) if order[k] != k] == [
        ("right kidney", "left kidney"), ("left kidney", "right kidney"),
        ("right adrenal gland", "left adrenal gland"), ("left adrenal gland", "right adrenal gland")]
    assert left_right_order(["background", "Left lung", "right lung", "heart", "leftover"]) == [0, 2, 1, 3, 4]


def test_a_left_right_mirror_swaps_the_paired_classes():
    """Right kidney (2, image value 1) at low x, left kidney (3, value 2) at high x: in every crop,
    mirrored or not, the organ on the low-x side is labelled 2 and the one on the high-x side 3, so
    the label names the side the organ appears on; a front/back mirror swaps nothing."""
    image = np.zeros((16, 8, 8), np.float32)
    label = np.zeros((16, 8, 8), np.uint8)
    image[2:5, 2:6, 2:6], label[2:5, 2:6, 2:6] = 1.0, 2
    image[10:14, 2:6, 2:6], label[10:14, 2:6, 2:6] = 2.0, 3
    order = [0, 1, 3, 2]
    ds = CropDataset([(image, label)], (16, 8, 8), num_samples=1, aug_prob=0.0, flip=(0, 1), flip_label_order=order)
    mirrored = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[0]
        img, lab = item["image"][0, 0].numpy(), item["label"][0, 0].numpy()
        low_x = lab[:8][lab[:8] > 0]
        high_x = lab[8:][lab[8:] > 0]
        assert set(low_x.tolist()) == {2} and set(high_x.tolist()) == {3}
        mirrored.add(bool(img[:8].max() == 2.0))  # the value-2 organ moved to the low-x side
        assert np.array_equal(np.unique(img[lab == 2]), [1.0 if img[:8].max() == 1.0 else 2.0])
    assert mirrored == {True, False}
    plain = CropDataset([(image, label)], (16, 8, 8), num_samples=1, aug_prob=0.0, flip=(1, 2), flip_label_order=order)
    assert set(np.unique(plain[0]["label"][0, 0, :8]).tolist()) == {0, 2}


def test_crop_fallback_when_no_labelled_voxel():
    image = np.ones((12, 12, 12), np.float32)
    ds = CropDataset([(image, np.zeros_like(image, np.uint8))], (8, 8, 8), num_samples=6, pos_fraction=1.0)
    _, positive = ds.draw_centres(0, ds.generator(0))
    assert not positive.any() and ds[0]["image"].shape == (6, 1, 8, 8, 8)


def test_crop_content_determinism_and_workers():
    rng = np.random.default_rng(0)
    volumes = [(rng.random((20, 18, 16)).astype(np.float32), (rng.random((20, 18, 16)) > 0.8).astype(np.uint8))
               for _ in range(4)]
    ds = CropDataset(volumes, (8, 8, 8), num_samples=2, aug_prob=0.0, seed=11, modality="MR")
    item = ds[2]
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert item["image"].shape == (2, 1, 8, 8, 8) and item["modality"] == "MR"
    # Without augmentation a crop is an exact window of the volume, centred on its drawn centre.
    centres, _ = ds.draw_centres(2, ds.generator(2))
    for k, centre in enumerate(centres):
        start = np.clip(centre - 4, 0, np.array([20, 18, 16]) - 8)
        window = tuple(slice(s, s + 8) for s in start)
        np.testing.assert_array_equal(item["image"][k, 0].numpy(), volumes[2][0][window])
        np.testing.assert_array_equal(item["label"][k, 0].numpy(), volumes[2][1][window])

    augmented = CropDataset(volumes, (8, 8, 8), seed=11, rotate_degrees=10, scale_range=0.1, flip=(1, 2))
    first = [augmented[i]["image"] for i in range(4)]
    loader = torch.utils.data.DataLoader(CropDataset(volumes, (8, 8, 8), seed=11, rotate_degrees=10,
                                                     scale_range=0.1, flip=(1, 2)),
                                         batch_size=2, num_workers=2, collate_fn=collate_crops)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 1, 8, 8, 8)] * 2
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.cat(first))
    augmented.set_epoch(1)
    assert not torch.equal(augmented[0]["image"], first[0])
    augmented.set_epoch(0)
    assert torch.equal(augmented[0]["image"], first[0])
    other_seed = CropDataset(volumes, (8, 8, 8), seed=12, rotate_degrees=10, scale_range=0.1, flip=(1, 2))
    assert not torch.equal(other_seed[0]["image"], first[0])


def test_intensity_augmentation_bounds_and_collate_modality():
    image = np.full((10, 10, 10), 0.5, np.float32)
    label = np.ones((10, 10, 10), np.uint8)
    ds = CropDataset([(image, label)], (10, 10, 10), num_samples=50, aug_prob=0.5, seed=3, modality="CT")
    crops = ds[0]["image"][:, 0]
    per_crop = crops.reshape(50, -1)
    assert torch.all(per_crop.max(1).values == per_crop.min(1).values)  # one scale/shift per crop
    values = per_crop[:, 0]
    assert values.min() >= 0.5 * 0.9 - 0.1 - 1e-6 and values.max() <= 0.5 * 1.1 + 0.1 + 1e-6
    changed = np.mean(np.abs(values.numpy() - 0.5) > 1e-7)
    assert 0.5 < changed < 0.95  # 1 - 0.5 * 0.5 = 0.75 of the crops are altered
    batch = collate_crops([ds[0], ds[0]])
    assert batch["image"].shape == (100, 1, 10, 10, 10) and batch["modality"] == ["CT"] * 100


def grid_sample_warp(image, label, angle, scales):
    """Oracle: the 3D grid of source positions through torch's trilinear / nearest grid_sample."""
    shape = image.shape
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(scales)
    centre = (np.array(shape) - 1) / 2.0
    offsets = np.stack(np.meshgrid(*[np.arange(n) - c for n, c in zip(shape, centre)], indexing="ij"), -1)
    source = offsets @ matrix.T + centre
    grid = torch.from_numpy(2.0 * source / np.maximum(np.array(shape) - 1, 1) - 1.0).flip(-1).float()[None]
    kw = dict(padding_mode="reflection", align_corners=True)
    img = F.grid_sample(torch.from_numpy(image)[None, None], grid, mode="bilinear", **kw)[0, 0].numpy()
    lab = F.grid_sample(torch.from_numpy(label).double()[None, None], grid.double(), mode="nearest", **kw)
    return img, lab[0, 0].round().long().numpy()


@pytest.mark.parametrize("shape, seed", [((33, 40, 17), 0), ((24, 24, 24), 1), ((16, 9, 5), 2), ((12, 10, 1), 3)])
def test_warp_equals_3d_grid_sample(shape, seed):
    from mulmodseg.data.sampling import warp
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    label = rng.integers(0, 14, shape)
    for _ in range(4):  # large angles and scales, so that reflection at the borders is exercised
        angle, scales = rng.uniform(-1.2, 1.2), rng.uniform(0.6, 1.4, size=3)
        img, lab = warp(image, label, angle, scales)
        ref_img, ref_lab = grid_sample_warp(image, label, angle, scales)
        assert img.dtype == np.float32 and img.shape == shape and lab.shape == shape
        np.testing.assert_allclose(img, ref_img, atol=2e-5)
        np.testing.assert_array_equal(lab, ref_lab)


def test_warp_identity_and_quarter_turn():
    from mulmodseg.data.sampling import warp
    rng = np.random.default_rng(1)
    image = rng.random((9, 9, 5)).astype(np.float32)
    label = rng.integers(0, 4, (9, 9, 5))
    same_image, same_label = warp(image, label, 0.0, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(same_image, image, atol=1e-5)
    np.testing.assert_array_equal(same_label, label)
    turned_image, turned_label = warp(image, label, np.pi / 2, [1.0, 1.0, 1.0])
    np.testing.assert_allclose(turned_image, np.rot90(image, -1, axes=(0, 1)), atol=1e-5)
    np.testing.assert_array_equal(turned_label, np.rot90(label, -1, axes=(0, 1)))


@pytest.mark.parametrize("warp_prob, low, high", [(1.0, 1.0, 1.0), (0.5, 0.35, 0.65), (0.0, 0.0, 0.0)])
def test_warp_prob_is_the_share_of_warped_crops(warp_prob, low, high):
    # The crop is the whole volume and intensity augmentation is off, so a crop differs only when warped.
    rng = np.random.default_rng(0)
    image = rng.random((12, 12, 6)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    ds = CropDataset([(image, label)], (12, 12, 6), num_samples=60, aug_prob=0.0, rotate_degrees=10,
                     scale_range=0.1, warp_prob=warp_prob, seed=4)
    crops = ds[0]["image"][:, 0].numpy()
    warped = np.mean([not np.allclose(c, image) for c in crops])
    assert low <= warped <= high
