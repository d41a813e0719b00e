"""Smoke test of the benchmark scripts: each runs with --quick (tiny sizes, nothing written) and prints
a table with numbers; the inference one also checks that ours and the peer agree with the same weights."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import mulmodseg.device

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


def table_rows(text: str, first_cell: str) -> list:
    """Cells of the Markdown table rows of ``text`` that start with ``first_cell``."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| " + first_cell)]
    return [[c.strip() for c in row] for row in rows]


def test_train_step_quick(capsys):
    import train_step

    train_step.main(["--quick", "--only", "unet", "--device", "cpu", "--also", "bf16", "bf16+channels_last"])
    rows = table_rows(capsys.readouterr().out, "UNet")
    assert [r[1] for r in rows] == ["ours MulModSeg-UNet", "our UNet + ref head", "ours MulModSeg-UNet, bf16",
                                    "ours MulModSeg-UNet, bf16+channels_last"]
    assert all(float(r[2]) > 0 for r in rows)
    assert float(rows[1][5]) == pytest.approx(1.0)  # the peer against itself


def test_a_failing_optional_contender_is_left_out_with_a_note(monkeypatch):
    import torch
    import train_step
    from peers import unet_contenders

    class Broken(torch.nn.Module):  # what torch.compile gives where Inductor finds no C compiler
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("no C compiler")
    monkeypatch.setattr(torch, "compile", Broken)
    notes = []
    fns = train_step.ours_variants(lambda: unet_contenders(4), "ours MulModSeg-UNet", ["bf16+compile", "bf16"],
                                   train_step.random_batch(1, 16), torch.device("cpu"), notes)
    assert list(fns) == ["ours MulModSeg-UNet, bf16"]
    assert notes == ["ours MulModSeg-UNet, bf16+compile: left out, it failed (RuntimeError: no C compiler)"]


def test_inference_quick_agrees_with_the_peer(capsys, monkeypatch):
    import inference

    monkeypatch.setattr(mulmodseg.device, "cpu_has_native_bf16", lambda: True)  # auto: bf16 on any test machine
    inference.main(["--quick", "--only", "unet", "--device", "cpu", "--also", "channels_last", "sw16", "auto"])
    rows = table_rows(capsys.readouterr().out, "UNet")
    assert [r[1] for r in rows] == ["ours MulModSeg-UNet + our inferer", "our UNet + ref head + MONAI inferer",
                                    "ours MulModSeg-UNet + our inferer, channels_last",
                                    "ours MulModSeg-UNet + our inferer, sw16",
                                    "ours MulModSeg-UNet + our inferer, auto: bf16, channels_last"]
    assert all(float(r[2]) > 0 for r in rows)
    # Same weights: our inferer + batched head == MONAI's + per-sample head, also with 16 windows per call;
    # channels_last differs more on the CPU (PyTorch's CPU norm kernels in that layout, bench/README.md);
    # the bf16 backbone by bf16's rounding.
    assert float(rows[0][7]) < 1e-4 and float(rows[3][7]) < 1e-4 and float(rows[2][7]) < 1e-3
    assert 1e-4 < float(rows[4][7]) < 0.1


def test_data_pipeline_quick(capsys):
    import data_pipeline

    data_pipeline.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    ours, peer = table_rows(out, "preprocess, ours"), table_rows(out, "preprocess, MONAI")
    assert len(ours) == len(peer) == 3  # the bundled CT and MR, and the synthetic CT
    assert all(float(r[2]) > 0 for r in ours + peer) and all(r[5] == "1.00x MONAI" for r in peer)
    rates = [float(m) for m in re.findall(r"([0-9.]+) crops/s", out)]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    warps = table_rows(out, "warp one crop")
    assert [r[1] for r in warps] == ["96^3 ours warp", "96^3 MONAI Affine"] and warps[1][5] == "1.00x MONAI"


def test_memory_quick(capsys):
    import memory

    memory.main(["--quick", "--only", "unet", "--device", "cpu"])
    rows = table_rows(capsys.readouterr().out, "inference")
    assert len(rows) == 2 and all(0 < float(r[2]) < 64 for r in rows)  # GiB


def test_gpu_script_is_valid_bash_and_runs_every_gpu_measurement():
    import subprocess

    script = BENCH / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    lines = [line.split() for line in script.read_text().splitlines() if line.startswith("step ")]
    assert {line[2] for line in lines} == {"bench/inference.py", "bench/train_step.py", "bench/memory.py",
                                           "bench/profile_step.py", "bench/profile_inference.py"}
    # The most important measurements come first: the memory peak before the compile steps.
    first_compile = next(i for i, line in enumerate(lines) if "bf16+compile" in line)
    assert next(i for i, line in enumerate(lines) if line[2] == "bench/memory.py") < first_compile


def test_profile_step_quick_lists_the_costliest_operators(capsys):
    import profile_step

    profile_step.main(["--quick", "--backbone", "unet", "--device", "cpu", "--amp", "none", "--rows", "5"])
    out = capsys.readouterr().out
    assert "Profile of one training step: ours unet, batch 2 x 32^3" in out
    assert "aten::" in out and "Self CPU" in out


def test_learn_quick(capsys, tmp_path):
    """One tiny training per normalisation variant, scored three ways on both bundled scans."""
    import learn

    out = learn.main(["--quick", "--out", str(tmp_path / "learn")])
    text = capsys.readouterr().out
    assert len(table_rows(text, "per_modality")) == len(table_rows(text, "shared")) == 6  # 3 readings x 2 scans
    assert set(out["results"]) == {(v, r) for v in ("per_modality", "shared") for r in learn.READINGS}
    for scores in out["results"].values():
        for dice, label in scores.values():
            assert dice.shape == (13,) and label.dtype == np.uint8
    assert (tmp_path / "learn" / "per_modality" / "last.pt").is_file()
    assert (tmp_path / "learn" / "shared" / "last.pt").is_file()
    # --score_only reads the same checkpoints again without training: the same scores.
    again = learn.main(["--quick", "--score_only", "--out", str(tmp_path / "learn")])
    assert "no training in this run" in capsys.readouterr().out
    for key, scores in out["results"].items():
        for modality, (dice, label) in scores.items():
            assert np.array_equal(again["results"][key][modality][1], label)


def test_profile_inference_quick_times_every_stage(capsys):
    """A tiny checkpoint built by train.py, one whole-scan inference of the bundled MR timed stage by stage."""
    import profile_inference

    profile_inference.main(["--quick", "--scan", str(BENCH.parent / "data/sample/mr/imagesTr/ts_mr_001.nii.gz"),
                            "--modality", "MR", "--amp", "none", "--rows", "5"])
    out = capsys.readouterr().out
    rows = {r[0]: r for r in table_rows(out, "") if r[0] != "stage"}
    assert list(rows)[:-1] == ["preprocess", "sliding window (network + blending)", "softmax",
                               "restoration + argmax", "write label map"]
    assert all(float(r[1]) >= 0 for r in rows.values())
    shares = sum(float(rows[name][2].rstrip(" %")) for name in list(rows)[:-1])
    assert shares == pytest.approx(100, abs=0.6) and rows["total"][2] == "100 %"
    assert "function calls" in out  # cProfile's table follows


def test_profile_inference_real_size_quick_times_a_resampled_ct_against_monai(capsys):
    """--real_size's CT (here a small grid: --quick) through infer.py's path, with MONAI's sliding window beside."""
    import profile_inference

    profile_inference.main(["--quick", "--real_size", "--peer", "--amp", "none", "--backbone", "swinunetr"])
    out = capsys.readouterr().out
    rows = {r[0]: r for r in table_rows(out, "") if r[0] != "stage"}
    assert float(rows["MONAI sliding window, fp32, same network"][1]) > 0
    assert float(rows["total"][3]) >= float(rows["preprocess"][3]) > 0  # peak memory only grows
    whole = float(rows["whole scan with MONAI's sliding window"][1])
    assert whole == pytest.approx(float(rows["total"][1]) - float(rows["sliding window (network + blending)"][1])
                                  + float(rows["MONAI sliding window, fp32, same network"][1]), rel=0.01)
    assert "a 96 x 96 x 60 CT at 0.8 x 0.8 x 1.5 mm" in out and "(swinunetr)" in out and "x on the whole scan" in out


def test_gradient_guard_quick_reports_healthy_norms(capsys):
    import gradient_guard

    gradient_guard.main(["--quick"])
    (row,) = table_rows(capsys.readouterr().out, "fp32")
    assert int(row[1]) == 2 and 0 < float(row[4]) <= float(row[2]) < 1e3 and row[5] == "0"


def test_heldout_stages_folds_counts_steps_and_tabulates_without_the_shared_data(tmp_path):
    # The benchmark's data are not in a fresh clone: its parts are checked on a dataset the test makes.
    import json

    import heldout
    import nibabel as nib

    source = tmp_path / "chaos"
    for sub in ("imagesTr", "labelsTr"):
        (source / sub).mkdir(parents=True)
        for case in ("p1", "p2", "p3", "p4"):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), source / sub / f"{case}.nii.gz")
    (source / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "6": "liver"}}))
    folds = heldout.chaos_split(source, tmp_path / "out", seed=0)
    assert sorted(folds[0]["val"] + folds[1]["val"]) == ["p1", "p2", "p3", "p4"]
    assert heldout.chaos_split(source, tmp_path / "out", seed=5) == folds  # written once, then reused
    staged = heldout.staged(source, folds[0]["train"], tmp_path / "stage")
    assert sorted(p.name for p in (staged / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in folds[0]["train"])
    assert all(p.is_symlink() for p in (staged / "imagesTr").iterdir())
    assert json.loads((staged / "dataset.json").read_text()) == {"labels": {"0": "background", "6": "liver"}}
    args = heldout.parse_args(["--runs", "a_fold0"])
    dirs = {"CT": [str(source)], "MR": [str(source), str(staged)]}  # 1 + ... scans: 4 + 2 MR, 4 CT
    alt, mr_only, background = (heldout.run_config(v, dirs, tmp_path / v, 120, args) for v in "abc")
    assert (alt.epochs, alt.mode, alt.augment, alt.mirror_axes) == (10, "alt", "paper", ())  # 2 x 6 steps
    assert (mr_only.epochs, mr_only.mode) == (20, "MR")  # 6 steps an epoch: the same 120 steps
    # c: every class of a CHAOS folder labelled, its 0s read as background (the library before partial labels).
    assert background.labelled == {str(source): list(heldout.CLASSES[1:])} and alt.labelled == {}
    nnunet = heldout.run_config("n", dirs, tmp_path / "n", 120, args)
    assert (nnunet.augment, nnunet.mirror_axes, nnunet.epochs) == ("nnunet", (0, 1, 2), 10)
    unmirrored = heldout.run_config("m", dirs, tmp_path / "m", 120, args)
    assert (unmirrored.augment, unmirrored.mirror_axes, unmirrored.epochs) == ("nnunet", (), 10)
    limited = heldout.run_config("f", dirs, tmp_path / "f", 120, args)
    assert (limited.augment, limited.fov_prob, limited.fov_min, alt.fov_prob) == ("paper", 0.3, 0.15, 0.0)
    remapped = heldout.run_config("r", dirs, tmp_path / "r", 120, args)
    assert (remapped.augment, remapped.remap_prob, alt.remap_prob) == ("paper", 0.3, 0.0)
    nan = float("nan")
    records = [{"dice": np.array([0.5, nan, nan, nan, nan, 0.9] + [nan] * 7)},
               {"dice": np.array([0.7, nan, nan, nan, nan, nan] + [nan] * 7)}]
    assert heldout.organ_cells(records, ("liver", "spleen"), "dice") == ["0.900", "0.600 ± 0.100", "0.750"]
    # Seconds per scan over every held-out set; the overlap defaults to infer.py's.
    assert heldout.inference_seconds({"MR": [{"seconds": 2.0}, {"seconds": 4.0}], "CT": [{"seconds": 6.0}]}) == 4.0
    # The fold's training patients get rows of their own ("-" for a run scored before they were).
    timed = [{**r, "seconds": 1.0} for r in records]
    row = {"seconds": 60.0, "scores": {"CHAOS MR": timed[:1], "CHAOS MR fit": timed[1:]}}
    text = heldout.table({"a_fold0": row, "b_fold0": {**row, "scores": {"CHAOS MR": timed[:1]}}}, "dice")
    assert "| CHAOS MR fit | spleen | 0.700 | - |" in text and "| CHAOS MR fit | mean | 0.700 | - |" in text
    assert "| CHAOS MR | liver | 0.900 | 0.900 |" in text
    assert args.overlap == 0.5 and heldout.parse_args(["--overlap", "0.25"]).overlap == 0.25
    # Predictions go to a folder of their own per inference setting; --keep_largest names no class: all of them.
    folder, settings, outputs = heldout.inference(args)
    assert (folder, settings.overlap, outputs.keep_largest) == ("heldout", 0.5, None)
    folder, settings, outputs = heldout.inference(heldout.parse_args(["--overlap", "0.25", "--keep_largest"]))
    assert (folder, settings.overlap, outputs.keep_largest) == ("heldout_overlap0.25_largest", 0.25, [])
    with pytest.raises(SystemExit):
        heldout.parse_args(["--runs", "a_fold2"])


def test_mr_limits_measures_grid_ceiling_contrast_and_what_the_others_need_without_the_shared_data(tmp_path, capsys):
    # The CHAOS scans are not in a fresh clone: two patients of blocks, one whose liver and spleen are dark.
    import mr_limits
    import nibabel as nib

    chaos = tmp_path / "data" / "chaos-mr-t2"
    for sub in ("imagesTr", "labelsTr"):
        (chaos / sub).mkdir(parents=True)
    label = np.zeros((40, 40, 12), np.uint8)
    label[4:20, 4:36, 2:10], label[24:32, 8:24, 2:10], label[24:32, 28:36, 4:8] = 6, 1, 2  # liver, spleen, kidney
    for case, organs in (("p1", 100.0), ("p2", 20.0)):
        image = np.where(label > 0, organs, 0.0).astype(np.float32)
        image[label == 2] = 200.0  # the kidney bright in both, so the percentiles span 0..200
        affine = np.diag([1.5, 1.5, 6.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), chaos / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), chaos / "labelsTr" / f"{case}.nii.gz")
    ceiling, contrast = mr_limits.grid_and_contrast(chaos / "imagesTr" / "p1.nii.gz", chaos / "labelsTr" / "p1.nii.gz",
                                                    (3.0, 3.0, 6.0))
    assert set(ceiling) == set(contrast) == {"liver", "spleen", "right kidney"}  # no left kidney: left out
    assert ceiling["liver"] > 0.95 and 0.8 < ceiling["right kidney"] <= 1.0  # a coarser grid loses the small one most
    assert contrast["liver"] == pytest.approx(0.5, abs=0.02) and contrast["right kidney"] == pytest.approx(1.0)
    _, dark = mr_limits.grid_and_contrast(chaos / "imagesTr" / "p2.nii.gz", chaos / "labelsTr" / "p2.nii.gz",
                                          (3.0, 3.0, 6.0))
    assert dark["spleen"] == pytest.approx(0.1, abs=0.02)
    # Held-out Dice come from each run's metrics.csv; unlabelled organs are left out.
    run = tmp_path / "runs" / "a_fold0"
    (run / "heldout" / "CHAOS_MR").mkdir(parents=True)
    (run / "heldout" / "CHAOS_MR" / "metrics.csv").write_text(
        "case,spleen,right kidney,left kidney,liver,stomach\np1,0.8,0.9,0.7,0.9,not labelled\n"
        "p2,0.0,0.9,0.8,0.1,not labelled\n")
    assert mr_limits.held_out_dice([run]) == {"p1": {"liver": 0.9, "spleen": 0.8, "right kidney": 0.9,
                                                     "left kidney": 0.7},
                                              "p2": {"liver": 0.1, "spleen": 0.0, "right kidney": 0.9,
                                                     "left kidney": 0.8}}
    # 3 patients, the worst at 0.1: the other two need (0.88 x 3 - 0.1) / 2.
    assert mr_limits.others_needed([0.1, 0.9, 0.8], 0.88) == pytest.approx(1.27)
    assert mr_limits.main(["--data", str(tmp_path / "data"), "--runs", str(run), "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| p2 |" in out and "| liver | 0.88 | 0.500 | 0.100 | 1.660 |" in out
    assert mr_limits.main(["--data", str(tmp_path / "none"), "--no-write"]) == 2


def test_ct_limits_derives_its_scans_from_the_sets_without_the_shared_data(tmp_path):
    # The sets are not in a fresh clone: a labelled "training CT" (LPS, 3 mm slices) and two held-out ones.
    import json

    import ct_limits
    import nibabel as nib

    image = np.full((6, 6, 30), -100.0, np.float32)
    label = np.zeros((6, 6, 30), np.uint8)
    image[:3, :, 10:20], label[:3, :, 10:20] = 40.0, 1  # spleen, slices 10..19
    image[3:, :, 5:25], label[3:, :, 5:25] = 60.0, 6  # liver
    lps = np.diag([-1.0, -1.0, 3.0, 1.0])
    data = tmp_path / "data"
    for sub in ("sample/ct", "ts-ct-slab", "msd-spleen-ct"):
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (data / sub / folder).mkdir(parents=True)
            nib.save(nib.Nifti1Image(array, lps), data / sub / folder / "case.nii.gz")
    (data / "sample" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}}))
    for sub in ("ts-ct-slab", "msd-spleen-ct"):
        (data / sub / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "6": "liver"}}))
    hu = ct_limits.organ_hu(*ct_limits.pair(data / "sample" / "ct"))
    assert hu == {"spleen": (40.0, 40.0, 40.0), "liver": (60.0, 60.0, 60.0)}
    rows = ct_limits.conditions(data, tmp_path / "out", shift=50.0, slab_mm=12.0)
    assert list(rows) == ["bundled CT (trained on)", "bundled CT (trained on), +50 HU",
                          "bundled CT (trained on), 12 mm slab on the spleen", "ts-ct-slab", "ts-ct-slab, -50 HU",
                          "msd-spleen-ct", "msd-spleen-ct, -50 HU"]
    brighter, _ = ct_limits.pair(rows["bundled CT (trained on), +50 HU"])
    darker, _ = ct_limits.pair(rows["ts-ct-slab, -50 HU"])
    assert np.asarray(brighter.dataobj).max() == 110.0 and np.asarray(darker.dataobj).max() == 10.0
    slab, slab_label = ct_limits.pair(rows["bundled CT (trained on), 12 mm slab on the spleen"])
    # 4 slices of 3 mm centred on the spleen's 10..19, placed where they lay in the scan.
    assert slab.shape == (6, 6, 4) and np.allclose(slab.affine[:3, 3], lps[:3, :3] @ [0, 0, 13])
    assert np.array_equal(slab_label, label[:, :, 13:17])
    # Each derived dataset labels what its set labels.
    assert json.loads((rows["ts-ct-slab, -50 HU"] / "dataset.json").read_text())["labels"] == {
        "0": "background", "6": "liver"}
    assert ct_limits.main(["--checkpoints", "x.pt", "--data", str(tmp_path / "none"), "--no-write"]) == 2
