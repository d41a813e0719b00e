"""mulmodseg.data.cases: case discovery in every folder layout and datalist, and the classes a dataset labels."""

import json

import numpy as np
import pytest
from helpers import SAMPLE, tiny, write_nifti

from mulmodseg.data import (
    DataError,
    check_cases,
    class_key,
    discover_amos,
    discover_cases,
    discover_modalities,
    has_validation_list,
    labelled_classes,
    labels_file,
    validation_cases,
)
from mulmodseg.text.prompts import resolve_classes

AMOS = resolve_classes("amos")


def write_labels(folder, labels):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return folder / "dataset.json"


def test_msd_and_nnunet_v2_labels_give_the_labelled_classes(tmp_path):
    msd = write_labels(tmp_path / "msd", {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney",
                                          "6": "liver"})
    v2 = write_labels(tmp_path / "v2", {"background": 0, "Spleen": 1, "left_kidney": 3})
    assert labelled_classes(AMOS, msd) == (1, 2, 3, 6)
    assert labelled_classes(AMOS, v2) == (1, 3)


def test_every_class_labelled_or_no_labels_means_all(tmp_path):
    full = write_labels(tmp_path / "full", {str(k): name for k, name in enumerate(AMOS)})
    assert labelled_classes(AMOS, full) is None
    assert labelled_classes(AMOS, None) is None
    (tmp_path / "nolabels").mkdir()
    (tmp_path / "nolabels" / "dataset.json").write_text(json.dumps({"training": []}))
    assert labelled_classes(AMOS, tmp_path / "nolabels" / "dataset.json") is None


def test_given_names_override_the_dataset_json(tmp_path):
    msd = write_labels(tmp_path / "msd", {"0": "background", "1": "spleen"})
    assert labelled_classes(AMOS, msd, given=["liver", "Right_Kidney"]) == (2, 6)


def test_unknown_names_and_values_of_another_class_are_all_reported(tmp_path):
    bad = write_labels(tmp_path / "bad", {"0": "background", "1": "spleen", "2": "kidneys", "3": "liver"})
    with pytest.raises(DataError) as error:
        labelled_classes(AMOS, bad)
    assert error.value.problems == [
        f"{bad}: class 'kidneys' is not one of the run's classes ({', '.join(AMOS[1:])}); rename it, or pass "
        "--classes with it",
        f"{bad}: label value 3 is named 'liver', which is class 6 of the run's classes; map it with --label_map 3:6",
    ]
    # With the label map the values are the classes.
    assert labelled_classes(AMOS, write_labels(tmp_path / "ok", {"0": "background", "3": "liver"}),
                            label_map={3: 6}) == (6,)
    with pytest.raises(DataError, match="--labelled: class 'livers'"):
        labelled_classes(AMOS, None, given=["livers"])


def test_labels_file_is_found_in_the_folder_or_its_parent(tmp_path):
    root = write_labels(tmp_path / "ds", {"0": "background", "1": "spleen"}).parent
    (root / "labelsTr").mkdir()
    assert labels_file(root / "labelsTr") == root / "dataset.json"
    assert labels_file(root) == root / "dataset.json"
    assert labels_file(tmp_path / "elsewhere") is None


def test_class_names_compare_without_case_and_separators():
    assert class_key(" Right_Kidney ") == class_key("right-kidney") == "right kidney"


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


def test_a_datalists_validation_list(tmp_path):
    assert not has_validation_list(tmp_path) and validation_cases(tmp_path, "CT") == []
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a_gt.nii.gz"}],
                                                       "validation": [{"image": "v.nii.gz", "label": "v_gt.nii.gz"}]}))
    assert has_validation_list(tmp_path)
    assert [(c.id, c.label.name) for c in validation_cases(tmp_path, "MR")] == [("v", "v_gt.nii.gz")]
    (tmp_path / "dataset.json").write_text("{not json")
    assert not has_validation_list(tmp_path)  # discovery reports the broken file
