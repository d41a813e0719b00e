"""mulmodseg.selection: several dataset folders per modality, each with the classes it labels."""

import dataclasses
import json
import re

import nibabel as nib
import numpy as np
import pytest

from mulmodseg import data as mdata
from mulmodseg.config import TrainConfig, TrainingError, check_config
from mulmodseg.selection import dataset_cases, dataset_records, select_cases


def labelled_dataset(folder, ids, labels=None, values=(1,)):
    """imagesTr/labelsTr of 8^3 volumes named ``ids`` whose labels hold ``values``; a dataset.json naming ``labels``
    (value -> name) when given."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in ids:
        label = np.zeros((8, 8, 8), np.uint8)
        for i, v in enumerate(values):
            label[i, :4, :4] = v
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), folder / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), folder / "labelsTr" / f"{case}.nii.gz")
    if labels is not None:
        (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", **labels}}))
    return str(folder)


def test_a_modality_takes_the_scans_of_all_its_folders_each_with_its_labelled_classes(tmp_path):
    full = labelled_dataset(tmp_path / "full", ["a1", "a2"])
    chaos = labelled_dataset(tmp_path / "chaos", ["c1", "c2", "c3"], {"1": "spleen", "6": "liver"}, values=(1, 6))
    spleen = labelled_dataset(tmp_path / "spleen", ["s1"], {"1": "spleen"})
    cfg = TrainConfig(data_dirs={"CT": [full, spleen], "MR": [chaos]}, text="onehot", classes="amos")
    cases, val_cases, _ = select_cases(cfg, lambda m: None)
    assert [(c.id, c.labelled) for c in cases["CT"]] == [("a1", None), ("a2", None), ("s1", (1,))]
    assert [(c.id, c.labelled) for c in cases["MR"]] == [("c1", (1, 6)), ("c2", (1, 6)), ("c3", (1, 6))]
    assert dataset_records(cfg) == {"CT": [{"dir": full, "labelled": "all"}, {"dir": spleen, "labelled": ["spleen"]}],
                                    "MR": [{"dir": chaos, "labelled": ["spleen", "liver"]}]}
    # --labelled overrides a folder's dataset.json.
    found, _ = dataset_cases(dataclasses.replace(cfg, labelled={chaos: ["liver"]}), ["MR"])
    assert {c.labelled for c in found["MR"]} == {(6,)}
    # One string is one folder (the Python API and older checkpoints).
    assert TrainConfig(data_dirs={"CT": full}).data_dirs == {"CT": [full]}


def test_folds_split_the_scans_of_every_folder_of_a_modality(tmp_path):
    a = labelled_dataset(tmp_path / "a", ["a1", "a2", "a3"])
    b = labelled_dataset(tmp_path / "b", ["b1", "b2", "b3"], {"1": "spleen"})
    cfg = TrainConfig(data_dirs={"MR": [a, b]}, text="onehot", out=str(tmp_path / "cv"), fold=0, num_folds=2)
    cases, val_cases, splits = select_cases(cfg, lambda m: None)
    assert sorted(c.id for c in cases["MR"] + val_cases["MR"]) == ["a1", "a2", "a3", "b1", "b2", "b3"]
    assert {c.id: c.labelled for c in cases["MR"] + val_cases["MR"]}["b2"] == (1,)
    assert splits["MR"][0]["val"] == [c.id for c in val_cases["MR"]]


def test_every_dataset_problem_is_reported_before_any_work(tmp_path):
    bad = labelled_dataset(tmp_path / "bad", ["x1"], {"1": "spleens"})
    outside = labelled_dataset(tmp_path / "outside", ["y1"], {"1": "spleen"}, values=(1, 7))
    cfg = TrainConfig(data_dirs={"CT": [bad], "MR": [outside]}, text="onehot")
    with pytest.raises(mdata.DataError) as error:
        select_cases(cfg, lambda m: None)
    assert len(error.value.problems) == 1 and "class 'spleens' is not one of the run's classes" in str(error.value)
    cases, _, _ = select_cases(dataclasses.replace(cfg, data_dirs={"MR": [outside]}), lambda m: None)
    with pytest.raises(mdata.DataError, match=re.escape("class values [7] are classes its dataset does not label "
                                                        "(it labels spleen)")):
        mdata.check_cases(cases["MR"], num_classes=14, class_names=cfg_classes())
    # The same case id in two folders of a modality is one problem per file.
    twin = labelled_dataset(tmp_path / "twin", ["y1"])
    cases, _, _ = select_cases(dataclasses.replace(cfg, data_dirs={"MR": [outside, twin]}), lambda m: None)
    with pytest.raises(mdata.DataError, match="duplicate case id 'y1'"):
        mdata.check_cases(cases["MR"], num_classes=14)


def test_labelled_must_name_a_dataset_folder_of_the_run(tmp_path):
    a = labelled_dataset(tmp_path / "a", ["a1"])
    with pytest.raises(TrainingError, match=re.escape(f"--labelled {tmp_path / 'b'}: not one of the run's dataset "
                                                      f"folders ({a})")):
        check_config(TrainConfig(data_dirs={"CT": [a]}, text="onehot", labelled={str(tmp_path / "b"): ["liver"]}))


def cfg_classes():
    from mulmodseg.text.prompts import resolve_classes
    return resolve_classes("amos")
