"""Dice on hand-made label maps, summaries, CSV/Markdown/JSON output (NSD and HD95: tests/test_surface.py; parameter
and FLOP counts: tests/test_cost.py)."""

import csv
import json
import math

import numpy as np
import pytest

import mulmodseg.metrics as metrics
from mulmodseg.metrics import (
    dice_per_class,
    markdown_table,
    summarise,
    write_metrics_csv,
    write_summary_csv,
)


def _volume():
    label = np.zeros((6, 5, 4), dtype=np.uint8)
    label[1:3, 1:3, 1:3] = 1  # 8 voxels
    label[4:6, 0:2, 0:1] = 2  # 4 voxels
    return label


def test_perfect_disjoint_absent_and_one_sided():
    label = _volume()
    assert np.array_equal(dice_per_class(label, label, 3), [1.0, 1.0])

    shifted = np.zeros_like(label)
    shifted[3:5, 3:5, 2:4] = 1  # class 1 nowhere near the true class 1, class 2 missed
    dice = dice_per_class(shifted, label, 4)
    assert dice[0] == 0.0 and dice[1] == 0.0  # disjoint, and present in the label only
    assert math.isnan(dice[2])  # class 3 in neither

    only_pred = label.copy()
    only_pred[0, 4, 3] = 3
    assert dice_per_class(only_pred, label, 4)[2] == 0.0  # present in the prediction only


def test_partial_overlap_value():
    label = _volume()
    pred = label.copy()
    pred[1, 1:3, 1:3] = 0  # 4 of the 8 class-1 voxels lost
    pred[0, 0, 0] = 2  # one false-positive class-2 voxel
    dice = dice_per_class(pred, label, 3)
    np.testing.assert_allclose(dice, [2 * 4 / (4 + 8), 2 * 4 / (5 + 4)])


def test_chunked_bincount_equals_single_pass(monkeypatch):
    rng = np.random.default_rng(0)
    pred, label = rng.integers(0, 5, (2, 20, 20, 20))
    whole = dice_per_class(pred, label, 5)
    monkeypatch.setattr(metrics, "_CHUNK", 777)
    np.testing.assert_array_equal(dice_per_class(pred, label, 5), whole)
    for c in range(1, 5):
        a, b = pred == c, label == c
        assert whole[c - 1] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_rejects_out_of_range_and_shape():
    with pytest.raises(ValueError):
        dice_per_class(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError):
        dice_per_class(np.zeros(3, int), np.zeros(4, int), 3)


ROWS = [
    {"case": "a", "modality": "CT", "dice": np.array([1.0, np.nan, 0.5])},
    {"case": "b", "modality": "CT", "dice": np.array([0.5, np.nan, 0.0])},
    {"case": "c", "modality": "MR", "dice": np.array([0.0, np.nan, np.nan])},
]
NAMES = ["liver", "pancreas", "spleen"]


def test_summarise_ignores_absent():
    summary = summarise(ROWS)
    np.testing.assert_allclose(summary["per_class"], [0.5, np.nan, 0.25])
    np.testing.assert_array_equal(summary["present"], [3, 0, 2])
    assert summary["mean"] == pytest.approx(0.375) and summary["cases"] == 3


def test_summarise_std_and_case_spread():
    summary = summarise(ROWS)
    # liver: 1, 0.5, 0 -> std sqrt(1/6); spleen: 0.5, 0 -> 0.25; case means 0.75, 0.25, 0.
    np.testing.assert_allclose(summary["std"], [math.sqrt(1 / 6), np.nan, 0.25])
    assert summary["case_std"] == pytest.approx(np.std([0.75, 0.25, 0.0]))
    hd = summarise([{"hd95": np.array([2.0, np.nan])}, {"hd95": np.array([4.0, np.nan])}], "hd95")
    np.testing.assert_allclose(hd["per_class"], [3.0, np.nan])
    np.testing.assert_allclose(hd["std"], [1.0, np.nan])


def test_metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    write_metrics_csv(path, ROWS, NAMES)
    lines = list(csv.reader(open(path)))
    assert lines[0] == ["case", "modality", "liver", "pancreas", "spleen", "mean"]
    assert lines[1] == ["a", "CT", "1.000000", "", "0.500000", "0.750000"]  # absent: an empty cell
    assert lines[3] == ["c", "MR", "0.000000", "", "", "0.000000"]
    assert "nan" not in path.read_text().lower() and "absent" not in path.read_text()
    with pytest.raises(ValueError):
        write_metrics_csv(path, ROWS, ["background", *NAMES])


def test_metrics_csv_with_surface_metrics(tmp_path):
    rows = [{**ROWS[0], "nsd": np.array([0.9, np.nan, 0.2]), "hd95": np.array([1.5, np.nan, 30.0])}]
    write_metrics_csv(tmp_path / "metrics.csv", rows, NAMES)
    header, line = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert header[6:] == ["NSD liver", "NSD pancreas", "NSD spleen", "NSD mean",
                          "HD95 liver", "HD95 pancreas", "HD95 spleen", "HD95 mean"]
    assert line[6:] == ["0.900000", "", "0.200000", "0.550000", "1.500000", "", "30.000000", "15.750000"]


def test_markdown_and_summary_csv(tmp_path):
    settings = {"CT, ALT": summarise(ROWS[:2]), "MR, ALT": summarise(ROWS[2:])}
    table = markdown_table(settings, NAMES)
    assert table.splitlines() == [
        "| Setting | liver | pancreas | spleen | Average |",
        "|---|---:|---:|---:|---:|",
        "| CT, ALT | 75.00 | absent | 25.00 | 50.00 |",
        "| MR, ALT | 0.00 | absent | absent | 0.00 |",
    ]
    # With std: liver 1, 0.5 -> 25 points; spleen 0.5, 0 -> 25; the case means 0.75, 0.25 -> 25.
    assert markdown_table(settings, NAMES, std=True).splitlines()[2] == (
        "| CT, ALT | 75.00 ± 25.00 | absent | 25.00 ± 25.00 | 50.00 ± 25.00 |")
    hd = {"CT": summarise([{"hd95": np.array([2.0, np.nan, 4.0])}], "hd95")}
    assert markdown_table(hd, NAMES, "hd95").splitlines()[2] == "| CT | 2.00 | absent | 4.00 | 3.00 |"

    path = tmp_path / "summary.csv"
    write_summary_csv(path, {"CT, ALT": {"dice": summarise(ROWS[:2])}}, NAMES)
    lines = list(csv.reader(open(path)))
    assert lines == [
        ["setting", "metric", "statistic", "liver", "pancreas", "spleen", "Average"],
        ["CT, ALT", "dice", "mean", "75.00", "", "25.00", "50.00"],
        ["CT, ALT", "dice", "std", "25.00", "", "25.00", "25.00"],
        ["CT, ALT", "dice", "n", "2", "0", "2", "2"],
    ]


def test_reports_hold_numbers_and_the_settings(tmp_path):
    rows = [{**row, "nsd": row["dice"] / 2, "hd95": row["dice"] * 10, "reference": f"labels/{row['case']}.nii.gz"}
            for row in ROWS]
    markdown = metrics.write_reports(tmp_path, rows, NAMES, "unet CT", {"nsd_tolerance_mm": 2.0}, "cost line")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(metrics.REPORT_FILES)
    assert "NSD at 2 mm (%), mean ± std over 3 case(s)" in markdown and markdown.endswith("cost line\n")
    assert "| unet CT | 5.00 ± 4.08 | absent | 2.50 ± 2.50 | 3.75 ± 3.12 |" in markdown  # HD95 in mm
    assert (tmp_path / "summary.md").read_text() == markdown
    summary_lines = list(csv.reader(open(tmp_path / "summary.csv")))
    assert len(summary_lines) == 1 + 3 * 3 and summary_lines[4][:4] == ["unet CT", "nsd", "mean", "25.00"]
    for line in summary_lines[1:]:  # numbers only, empty where absent
        assert all(cell == "" or math.isfinite(float(cell)) for cell in line[3:])
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["setting"] == "unet CT" and report["settings"] == {"nsd_tolerance_mm": 2.0}
    assert report["classes"] == NAMES
    assert report["foreground_mean"]["dice"]["mean"] == pytest.approx(0.375)
    assert report["mean"]["liver"]["nsd"] == {"mean": 0.25, "std": pytest.approx(math.sqrt(1 / 6) / 2), "n": 3}
    assert report["mean"]["pancreas"]["hd95"] == {"mean": None, "std": None, "n": 0}
    case = report["metric_per_case"][0]
    assert case["case"] == "a" and case["reference"] == "labels/a.nii.gz"
    assert case["metrics"]["spleen"] == {"dice": 0.5, "nsd": 0.25, "hd95": 5.0}
    assert case["metrics"]["pancreas"]["dice"] is None
