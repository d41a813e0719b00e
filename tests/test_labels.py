"""mulmodseg.data.labels: label maps (parsed in every spelling, applied in preprocessing) and left/right class pairs."""
import json

import numpy as np
import pytest
from helpers import tiny, write_nifti

from mulmodseg.data import DataError, parse_label_map, preprocess

MMWHS = {205: 1, 420: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7}


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
