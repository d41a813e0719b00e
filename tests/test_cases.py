"""mulmodseg.data.cases: the classes a dataset labels (dataset.json ``labels`` or ``--labelled``)."""

import json

import pytest

from mulmodseg.data import DataError, class_key, labelled_classes, labels_file
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
