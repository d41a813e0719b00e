"""python -m mulmodseg.evaluate on small hand-made label maps: names matched as infer.py matches them, the
numbers of mulmodseg.metrics on each label's spacing, every problem reported before any scoring."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mulmodseg.cli.evaluate import main
from mulmodseg.data import DataError
from mulmodseg.metrics import REPORT_FILES, case_metrics
from mulmodseg.scoring import evaluate_folders

ROOT = Path(__file__).resolve().parent.parent
AFFINE = np.diag([0.8, 1.2, 2.5, 1.0])  # anisotropic voxels, in mm
CLASSES = ["background", "liver", "spleen", "kidney"]


def save(array, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)


def pair(seed, shape=(20, 16, 12)):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[3:12, 2:10, 2:8] = 1
    label[14:18, 10:15, 5:11] = 2
    pred = label.copy()
    pred[rng.random(shape) < 0.05] = 0
    pred[10:13, 2:10, 2:8] = 1
    return pred, label


@pytest.fixture
def folders(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    for name, seed in (("a", 0), ("b", 1)):
        pred, label = pair(seed)
        # nnU-Net's channel suffix on a prediction finds b.nii.gz, as infer.py's --labels does.
        save(pred, tmp_path / "pred" / ("b_0000.nii.gz" if name == "b" else f"{name}.nii.gz"))
        save(label, tmp_path / "labels" / f"{name}.nii.gz")
    return tmp_path, classes


def test_scores_a_folder_with_the_labels_spacing(folders):
    tmp_path, classes = folders
    assert main(["--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"), "--classes", str(classes),
                 "--nsd_tolerance", "1.5", "--modality", "CT", "--output", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(REPORT_FILES)
    expected = [case_metrics(*pair(seed), 4, (0.8, 1.2, 2.5), nsd_tolerance=1.5) for seed in (0, 1)]
    with open(tmp_path / "out" / "metrics.csv") as f:
        header, *lines = list(csv.reader(f))
    assert header[:6] == ["case", "modality", "liver", "spleen", "kidney", "mean"]
    assert [line[:2] for line in lines] == [["a", "CT"], ["b", "CT"]]
    for line, want in zip(lines, expected):
        assert float(line[2]) == pytest.approx(want["dice"][0], abs=1e-6)
        assert float(line[header.index("NSD spleen")]) == pytest.approx(want["nsd"][1], abs=1e-6)
        assert float(line[header.index("HD95 liver")]) == pytest.approx(want["hd95"][0], abs=1e-6)
        assert line[4] == line[header.index("HD95 kidney")] == ""  # kidney is in neither map
    assert 0 < expected[0]["nsd"][0] < 1 and expected[0]["hd95"][0] > 0  # the numbers are not trivial
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["settings"]["nsd_tolerance_mm"] == 1.5 and report["classes"] == CLASSES[1:]
    assert [c["reference"] for c in report["metric_per_case"]] == [str(tmp_path / "labels" / n)
                                                                 for n in ("a.nii.gz", "b.nii.gz")]
    mean_hd95 = np.mean([e["hd95"][0] for e in expected])
    assert report["mean"]["liver"]["hd95"]["mean"] == pytest.approx(mean_hd95)
    assert report["mean"]["liver"]["hd95"]["std"] == pytest.approx(np.std([e["hd95"][0] for e in expected]))
    assert "| pred CT |" in (tmp_path / "out" / "summary.md").read_text()


def test_every_problem_at_once_and_nothing_written(folders):
    tmp_path, classes = folders
    save(np.zeros((20, 16, 11), np.uint8), tmp_path / "pred" / "short.nii.gz")
    save(np.zeros((20, 16, 12), np.uint8), tmp_path / "labels" / "short.nii.gz")
    save(np.zeros((20, 16, 12), np.uint8), tmp_path / "pred" / "lonely.nii.gz")
    wrong = np.zeros((20, 16, 12), np.uint8)
    wrong[0, 0, 0] = 7
    save(wrong, tmp_path / "pred" / "seven.nii.gz")
    save(np.zeros((20, 16, 12), np.uint8), tmp_path / "labels" / "seven.nii.gz")
    with pytest.raises(DataError) as error:
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", classes, log=lambda m: None)
    problems = error.value.problems
    assert len(problems) == 3
    assert f"{tmp_path / 'pred' / 'lonely.nii.gz'}: no label file with this name in {tmp_path / 'labels'}" in problems
    assert any(p.startswith(f"{tmp_path / 'pred' / 'short.nii.gz'}: prediction shape (20, 16, 11) differs from "
                            "label shape (20, 16, 12)") for p in problems)
    assert f"{tmp_path / 'pred' / 'seven.nii.gz'}: class values [7] >= num_classes=4" in problems
    assert not any((tmp_path / "pred" / name).exists() for name in REPORT_FILES)


def test_label_map_and_a_prediction_stored_in_other_axes(tmp_path):
    label = np.zeros((10, 8, 6), np.uint16)
    label[2:6, 2:6, 1:4] = 205
    pred = label.copy()
    pred[6, 2:6, 1:4] = 420  # a slab of the second class, which the label lacks
    save(label, tmp_path / "labels" / "c.nii.gz")
    # Stored flipped along x, with an affine that says so: the same voxels in the world.
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -0.8, 0.8 * 9
    save(pred[::-1], tmp_path / "pred" / "c.nii.gz", flipped)
    rows = evaluate_folders(tmp_path / "pred", tmp_path / "labels", ["background", "a", "b"], "205:1,420:2",
                            output_dir=tmp_path / "out", log=lambda m: None)
    assert rows[0]["dice"][0] == 1.0 and rows[0]["nsd"][0] == 1.0 and rows[0]["hd95"][0] == 0.0
    diagonal = np.sqrt((10 * 0.8) ** 2 + (8 * 1.2) ** 2 + (6 * 2.5) ** 2)
    assert rows[0]["dice"][1] == 0.0 and rows[0]["nsd"][1] == 0.0 and rows[0]["hd95"][1] == pytest.approx(diagonal)


def test_command_line(folders):
    tmp_path, classes = folders
    proc = subprocess.run([sys.executable, "-m", "mulmodseg.evaluate", "--pred", str(tmp_path / "pred"),
                           "--labels", str(tmp_path / "missing"), "--classes", str(classes)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    # A data problem exits 3; a bad flag value (below) 2, argparse's code.
    assert proc.returncode == 3 and f"--labels {tmp_path / 'missing'}: no such folder" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mulmodseg.evaluate", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    for flag in ("--pred", "--labels", "--classes", "--label_map", "--nsd_tolerance", "--output", "--version"):
        assert flag in proc.stdout
    assert "3 a problem in the data" in proc.stdout
    assert main(["--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"), "--classes", str(classes),
                 "--nsd_tolerance", "-1"]) == 2


def test_a_partially_labelled_reference_scores_only_what_its_dataset_labels(folders):
    tmp_path, classes = folders
    # The labels' dataset labels liver only: spleen is "not labelled", whatever is predicted there.
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    for name in ("a", "b"):
        label = np.asarray(nib.load(tmp_path / "labels" / f"{name}.nii.gz").dataobj)
        save(np.where(label == 1, 1, 0).astype(np.uint8), tmp_path / "labels" / f"{name}.nii.gz")
    rows = evaluate_folders(tmp_path / "pred", tmp_path / "labels", str(classes), output_dir=tmp_path / "out",
                            log=lambda m: None)
    full = case_metrics(*pair(0), 4, (0.8, 1.2, 2.5))
    assert rows[0]["dice"][0] == full["dice"][0] and np.isnan(rows[0]["dice"][1:]).all()
    assert rows[0]["labelled"].tolist() == [True, False, False]
    with open(tmp_path / "out" / "metrics.csv") as f:
        header, first, _ = list(csv.reader(f))
    assert first[2:6] == [f"{full['dice'][0]:.6f}", "not labelled", "not labelled", f"{full['dice'][0]:.6f}"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| not labelled | not labelled |" in summary and "absent" not in summary
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["mean"]["spleen"]["dice"] == {"mean": None, "std": None, "n": 0, "labelled": 0}
    assert report["metric_per_case"][0]["labelled"] == ["liver"]
    # --labelled overrides the dataset.json; a label value outside it is a problem before any scoring.
    assert main(["--pred", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels"), "--classes", str(classes),
                 "--labelled", "liver", "kidney", "--output", str(tmp_path / "out2")]) == 0
    with open(tmp_path / "out2" / "metrics.csv") as f:
        assert list(csv.reader(f))[1][3] == "not labelled"
    save(np.full((20, 16, 12), 2, np.uint8), tmp_path / "labels" / "a.nii.gz")
    with pytest.raises(DataError, match=r"a.nii.gz: class values \[2\] are classes its dataset does not label "
                                        r"\(it labels liver\)"):
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", str(classes), log=lambda m: None)
