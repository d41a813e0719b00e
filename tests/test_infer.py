"""infer.py end to end on the real sample CT (RAS) and MR (LPS) with checkpoints trained here for one epoch."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mulmodseg import data as mdata
from mulmodseg import device as mdevice
from mulmodseg import outputs, predict
from mulmodseg.cli import predict as predict_cli
from mulmodseg.cli import train as train_cli
from mulmodseg.cost import count_flops
from mulmodseg.data import DataError
from mulmodseg.outputs import OutputOptions, find_inputs, input_share, output_path, write_like
from mulmodseg.postprocess import component_sizes, postprocess
from mulmodseg.predict import (
    Ensemble,
    InferenceSettings,
    Segmenter,
    load_model,
    segment_files,
    write_evaluation,
)
from mulmodseg.training import train
from mulmodseg.viz import read_png

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
CT = SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz"
MR = SAMPLE / "mr" / "imagesTr" / "ts_mr_001.nii.gz"
PREVIEW = OutputOptions(preview=True)


def trained(tmp_path_factory, text: str) -> Path:
    out = tmp_path_factory.mktemp(f"run_{text}")
    args = train_cli.build_parser().parse_args([
        "--backbone", "unet", "--base_channels", "4", "--text", text, "--roi_size", "32", "--epochs", "1",
        "--spacing", "6", "6", "6",  # 1/60 of the voxels of the default grid: seconds per scan on 2 CPU cores
        "--num_workers", "0", "--out", str(out / "run"), "--cache_dir", str(out / "cache"),
    ])
    train(train_cli.config_from_args(args), log=lambda m: None)
    return out / "run" / "last.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained(tmp_path_factory, "onehot")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("scan,modality", [(CT, "CT"), (MR, "MR")])
def test_label_map_lands_on_the_input_grid(tmp_path, checkpoint, scan, modality):
    before = sha(scan)
    code, log = run("--checkpoint", checkpoint, "--modality", modality, "--input", scan, "--output", tmp_path,
                    "--preview", "--save_probabilities", "--sw_batch_size", "2")
    assert code == 0, log
    assert sha(scan) == before  # the input is never modified
    src, out = nib.load(str(scan)), nib.load(str(output_path(scan, tmp_path)))
    assert out.shape == src.shape
    assert np.array_equal(out.affine, src.affine)
    assert np.allclose(out.get_qform(), src.get_qform()) and np.allclose(out.get_sform(), src.get_sform())
    assert int(out.header["qform_code"]) == int(src.header["qform_code"])
    assert out.get_data_dtype() == np.uint8
    labels = np.asanyarray(out.dataobj)
    assert labels.min() >= 0 and labels.max() <= 13
    with np.load(output_path(scan, tmp_path, "_probabilities.npz")) as saved:
        probs, classes = saved["probabilities"], list(saved["classes"])
    assert probs.shape == (14, *src.shape) and probs.dtype == np.float16 and classes[6] == "liver"
    assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)  # a softmax at every voxel
    # Voxels whose centre lies outside the foreground crop are background with certainty.
    _, config = load_model(checkpoint)
    _, _, meta = mdata.preprocess(scan, None, modality, **config["preprocess"][modality])
    outside = mdata.restore(np.ones(meta["shape"], np.uint8), meta, "nearest") == 0
    assert outside.any() and not outside.all()
    assert np.all(probs[0][outside] == 1) and np.all(probs[1:, outside] == 0)
    png = read_png(output_path(scan, tmp_path, ".png"))
    assert png.ndim == 3 and png.shape[2] == 3 and png.shape[0] > 50
    assert f"{scan.name} -> " in log and "ETA" in log


def test_refuses_to_overwrite_outputs_and_inputs(tmp_path, checkpoint):
    args = ["--checkpoint", checkpoint, "--modality", "CT", "--input", CT, "--output", tmp_path]
    assert run(*args)[0] == 0
    first = sha(output_path(CT, tmp_path))
    code, log = run(*args)
    # Exit 3: a data problem found by the checks (2 is argparse's, for bad flags).
    assert code == 3 and "exists; pass --overwrite" in log and str(output_path(CT, tmp_path)) in log
    assert sha(output_path(CT, tmp_path)) == first
    assert run(*args, "--overwrite")[0] == 0

    copy_dir = tmp_path / "scans"
    copy_dir.mkdir()
    copy = copy_dir / CT.name
    shutil.copy(CT, copy)
    code, log = run("--checkpoint", checkpoint, "--modality", "CT", "--input", copy, "--output", copy_dir,
                    "--overwrite")
    assert code == 3 and "would replace an input scan" in log
    assert sha(copy) == sha(CT)


def test_clear_errors_for_bad_arguments(tmp_path, checkpoint):
    code, log = run("--checkpoint", checkpoint, "--modality", "PET", "--input", CT, "--output", tmp_path)
    assert code == 2 and "trained on ['CT', 'MR']" in log
    code, log = run("--checkpoint", tmp_path / "none.pt", "--modality", "CT", "--input", CT, "--output", tmp_path)
    assert code == 2 and "none.pt: no such checkpoint file" in log
    code, log = run("--checkpoint", checkpoint.parent, "--modality", "CT", "--input", CT, "--output", tmp_path)
    assert code == 2 and f"{checkpoint.parent}: a folder, not a checkpoint file; use {checkpoint}" in log
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    code, log = run("--checkpoint", bad, "--modality", "CT", "--input", CT, "--output", tmp_path)
    assert code == 2 and "bad.pt: not a readable checkpoint" in log
    code, log = run("--checkpoint", checkpoint, "--modality", "CT", "--input", tmp_path / "missing",
                    "--output", tmp_path)
    assert code == 3 and "missing: no such file or folder" in log
    scans = tmp_path / "scans"
    scans.mkdir()
    # 12 mm wide: 2 voxels at the checkpoint's 6 mm (8 mm would be 1, a scan collapsed to a plane: a problem too).
    nib.save(nib.Nifti1Image(np.full((12, 12, 12), np.nan, np.float32), np.eye(4)), scans / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), scans / "four_d.nii.gz")
    (scans / "broken.nii.gz").write_bytes(CT.read_bytes()[:5000])
    code, log = run("--checkpoint", checkpoint, "--modality", "CT", "--input", scans, "--output", tmp_path / "out")
    assert code == 3 and "3 data problem(s)" in log
    for name in ("nan.nii.gz", "four_d.nii.gz", "broken.nii.gz"):
        assert str(scans / name) in log
    assert not (tmp_path / "out").exists()


def test_evaluation_writes_dice_tables_in_the_original_space(tmp_path, checkpoint):
    code, log = run("--checkpoint", checkpoint, "--modality", "CT", "--input", CT.parent, "--output", tmp_path,
                    "--labels", SAMPLE / "ct" / "labelsTr")
    assert code == 0, log
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("case,modality,spleen")
    assert rows[1].startswith("ts_ct_001,CT,")
    header, cells = rows[0].split(","), rows[1].split(",")
    # Esophagus is in neither the label nor (after 1 epoch) the prediction: empty cells, never text.
    assert cells[header.index("esophagus")] == cells[header.index("NSD esophagus")] == ""
    assert all(cell == "" or 0 <= float(cell) for cell in cells[2:])
    assert header[-1] == "HD95 mean" and len(header) == 2 + 3 * 14
    summary = (tmp_path / "summary.md").read_text()
    assert "| unet CT |" in summary and "parameters" in summary and "GFLOPs per 32x32x32 window" in summary
    assert "NSD at 2 mm (%)" in summary and "HD95 (mm)" in summary
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["settings"]["backbone"] == "unet" and report["metric_per_case"][0]["case"] == "ts_ct_001"


def test_wrong_modality_prompts_change_the_output(tmp_path, checkpoint):
    probs = []
    for name, extra in (("right", []), ("wrong", ["--prompt_modality", "CT"])):
        code, log = run("--checkpoint", checkpoint, "--modality", "MR", "--input", MR, "--output", tmp_path / name,
                        "--save_probabilities", *extra)
        assert code == 0, log
        with np.load(output_path(MR, tmp_path / name, "_probabilities.npz")) as saved:
            probs.append(saved["probabilities"])
    assert np.abs(probs[0].astype(np.float32) - probs[1].astype(np.float32)).max() > 1e-3


def test_vision_only_checkpoint(tmp_path_factory, tmp_path, capsys):
    ckpt = trained(tmp_path_factory, "none")
    args = ["--checkpoint", str(ckpt), "--modality", "MR", "--input", str(MR), "--output", str(tmp_path)]
    assert predict_cli.main(args) == 0
    assert nib.load(str(output_path(MR, tmp_path))).shape == nib.load(str(MR)).shape
    # It has no prompts to swap, so the wrong-modality test cannot run on it.
    assert predict_cli.main([*args, "--overwrite", "--prompt_modality", "CT"]) == 2
    assert "error: --prompt_modality CT: this checkpoint is vision-only" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--sw_batch_size", "0", "--sw_batch_size 0: must be a whole number of windows, at least 1"),
    ("--overlap", "1.0", r"--overlap 1.0: must be in \[0, 1\)"),
    ("--overlap", "-0.5", r"--overlap -0.5: must be in \[0, 1\)"),
])
def test_bad_window_flags_fail_before_the_checkpoint_loads(tmp_path, capsys, flag, value, message):
    code = predict_cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--modality", "CT", "--input", str(CT),
                             "--output", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and "none.pt" not in err
    assert not (tmp_path / "out").exists()


def test_existing_probabilities_and_previews_are_not_replaced(tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    extras = [output_path(CT, out, "_probabilities.npz"), output_path(CT, out, ".png")]
    for path in extras:
        path.write_bytes(b"earlier result")
    with pytest.raises(DataError) as error:
        segment_files(checkpoint, [CT], out, "CT", outputs=OutputOptions(probabilities=True, preview=True),
                      log=lambda m: None)
    for path in extras:
        assert f"{path}: exists; pass --overwrite" in str(error.value) and path.read_bytes() == b"earlier result"
    assert not output_path(CT, out).exists()
    (out / "metrics.csv").write_text("earlier,table\n")
    with pytest.raises(DataError, match="metrics.csv: exists; pass --overwrite"):
        segment_files(checkpoint, [CT], out, "CT", labels_dir=SAMPLE / "ct" / "labelsTr", log=lambda m: None)


def test_label_maps_do_not_inherit_the_scans_display_settings(tmp_path):
    scan = nib.load(str(CT))
    header = scan.header.copy()
    header["cal_min"], header["cal_max"] = -1000, 2000
    header.set_intent("estimate", name="HU")
    header["descrip"] = b"CT abdomen"
    header.set_xyzt_units("mm", "sec")
    reference = nib.Nifti1Image(np.asanyarray(scan.dataobj), scan.affine, header)
    labels = np.zeros(scan.shape, np.uint8)
    labels[40:60, 30:50, 50:70] = 6
    write_like(labels, reference, tmp_path / "labels.nii.gz")
    out = nib.load(str(tmp_path / "labels.nii.gz"))
    assert float(out.header["cal_min"]) == 0 and float(out.header["cal_max"]) == 0
    assert out.header.get_intent() == ("none", (), "")
    assert out.header["descrip"].tobytes().rstrip(b"\0") == b"mulmodseg labels"
    assert np.array_equal(out.affine, scan.affine) and np.array_equal(out.get_sform(), scan.get_sform())
    assert [int(out.header[c]) for c in ("qform_code", "sform_code")] == [int(scan.header["qform_code"]),
                                                                          int(scan.header["sform_code"])]
    assert out.header.get_zooms() == scan.header.get_zooms() and out.header.get_xyzt_units() == ("mm", "sec")
    assert np.array_equal(np.asanyarray(out.dataobj), labels)


def test_flops_are_counted_where_the_model_is(tmp_path, checkpoint, monkeypatch):
    """A meta-device model has no data to copy: moving it to the CPU (as before) would raise."""
    ensemble = Ensemble([checkpoint])
    segmenter = ensemble.members[0]
    expected = count_flops(segmenter.model, (1, 1, 32, 32, 32), modality="CT")
    segmenter.model.to("meta")
    counted = []

    def spy(model, shape, **kwargs):
        counted.append((next(model.parameters()).device.type, count_flops(model, shape, **kwargs)))
        return counted[-1][1]

    monkeypatch.setattr(predict, "count_flops", spy)
    records = [{"case": "a", "modality": "CT", "dice": np.full(13, 0.5), "seconds": 1.0}]
    write_evaluation(records, ensemble, tmp_path, "CT", log=lambda m: None)
    assert counted == [("meta", expected)] and expected > 0
    assert next(segmenter.model.parameters()).device.type == "meta"
    assert "GFLOPs per 32x32x32 window" in (tmp_path / "summary.md").read_text()


def test_help_explains_every_flag():
    text = predict_cli.build_parser().format_help()
    for flag in ("--checkpoint", "--modality", "--input", "--output", "--overwrite", "--labels", "--save_probabilities",
                 "--preview", "--tta", "--device", "--sw_batch_size", "--overlap", "--prompt_modality",
                 "--nsd_tolerance", "--amp", "--channels_last", "--threads", "--keep_largest", "--min_component_mm3",
                 "--per_class", "--statistics", "--version", "-i INPUT", "-o OUTPUT", "--into_input_folder"):
        assert flag in text
    assert "3 a problem in the data" in text and "130 interrupted" in text
    args = predict_cli.build_parser().parse_args(["--checkpoint", "c.pt", "--modality", "CT", "-i", "a", "-o", "b"])
    assert (args.input, args.output, args.keep_largest, args.min_component_mm3) == ("a", "b", None, None)


def test_label_map_runs_write_the_dataset_values(tmp_path):
    """Trained with 6 (liver) -> class 1 and every other organ dropped, the output holds 0 and 6."""
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nliver\n")
    mapping = ",".join(f"{v}:{1 if v == 6 else 0}" for v in range(1, 14))
    args = train_cli.build_parser().parse_args([
        "--backbone", "unet", "--base_channels", "4", "--text", "onehot", "--roi_size", "32", "--epochs", "1",
        "--spacing", "6", "6", "6", "--num_workers", "0", "--classes", str(classes), "--label_map", mapping,
        "--out", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"), "--lr", "1e-2",
    ])
    train(train_cli.config_from_args(args), log=lambda m: None)
    code, log = run("--checkpoint", tmp_path / "run" / "last.pt", "--modality", "CT", "--input", CT,
                    "--output", tmp_path / "out", "--labels", SAMPLE / "ct" / "labelsTr")
    assert code == 0, log
    values = set(np.unique(np.asanyarray(nib.load(str(output_path(CT, tmp_path / "out"))).dataobj)).tolist())
    assert values <= {0, 6}
    header, row = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[:2]
    assert header.split(",")[:3] == ["case", "modality", "liver"]
    # dataset.json names the values the file holds: the dataset's own.
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 6}

    # The same label stored as float32 (as some tools write them) is read as training reads it.
    label = nib.load(str(SAMPLE / "ct" / "labelsTr" / CT.name))
    (tmp_path / "float_labels").mkdir()
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj).astype(np.float32), label.affine),
             tmp_path / "float_labels" / CT.name)
    records = segment_files(tmp_path / "run" / "last.pt", [CT], tmp_path / "out_float", "CT",
                            labels_dir=tmp_path / "float_labels", log=lambda m: None)
    assert f"{records[0]['dice'][0]:.6f}" == row.split(",")[2]


def test_the_window_size_is_stored_once_and_older_checkpoints_load_alike(tmp_path, checkpoint):
    saved = torch.load(checkpoint, weights_only=False)
    assert "roi_size" not in saved["config"] and "min_size" not in saved["config"]["preprocess"]["CT"]
    config = load_model(checkpoint)[1]
    assert config["preprocess"]["CT"]["min_size"] == config["preprocess"]["MR"]["min_size"] == [32, 32, 32]
    # A checkpoint written before (the window also at the top and in each modality's preprocessing) reads the same.
    saved["config"]["roi_size"] = [32, 32, 32]
    for settings in saved["config"]["preprocess"].values():
        settings["min_size"] = [32, 32, 32]
    torch.save(saved, tmp_path / "before.pt")
    assert load_model(tmp_path / "before.pt")[1]["preprocess"] == config["preprocess"]
    assert Segmenter(tmp_path / "before.pt").roi_size == Segmenter(checkpoint).roi_size == (32, 32, 32)


def test_labels_with_the_image_name_and_colliding_outputs(tmp_path, checkpoint):
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    scans.mkdir()
    labels.mkdir()
    # Not an nnU-Net layout: the label has the image's own name, which ends in _0000 by chance.
    shutil.copy(CT, scans / "scan_0000.nii.gz")
    shutil.copy(SAMPLE / "ct" / "labelsTr" / CT.name, labels / "scan_0000.nii.gz")
    records = segment_files(checkpoint, [scans / "scan_0000.nii.gz"], tmp_path / "out", "CT",
                            labels_dir=labels, log=lambda m: None)
    assert records[0]["output"] == str(tmp_path / "out" / "scan.nii.gz") and len(records[0]["dice"]) == 13

    shutil.copy(CT, scans / "scan.nii.gz")  # scan_0000.nii.gz and scan.nii.gz would both write scan.nii.gz
    with pytest.raises(DataError, match=r"scan_0000.nii.gz: would write .*out2/scan.nii.gz, as .*/scan.nii.gz does"):
        segment_files(checkpoint, find_inputs(scans), tmp_path / "out2", "CT", log=lambda m: None)
    assert not (tmp_path / "out2").exists()


def test_a_scan_stored_with_a_trailing_axis_of_one(tmp_path, checkpoint):
    # The sample MR written as (X, Y, Z, 1), label too: same label map as the 3D file, written 3D on its grid.
    src = nib.load(str(MR))
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    for folder, path in ((scans, MR), (labels, SAMPLE / "mr" / "labelsTr" / MR.name)):
        img = nib.load(str(path))
        folder.mkdir()
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine, img.header), folder / MR.name)
    want = segment_files(checkpoint, [MR], tmp_path / "want", "MR", labels_dir=SAMPLE / "mr" / "labelsTr",
                         log=lambda m: None)
    got = segment_files(checkpoint, [scans / MR.name], tmp_path / "got", "MR", labels_dir=labels, log=lambda m: None)
    out = nib.load(got[0]["output"])
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(nib.load(want[0]["output"]).dataobj))
    assert np.array_equal(got[0]["dice"], want[0]["dice"], equal_nan=True)


def test_label_files_are_inputs_too(tmp_path, checkpoint):
    # --output is the labels folder and the label has the output's name: refused even with --overwrite,
    # never a label replaced by the prediction and then scored against itself.
    labels = tmp_path / "labels"
    labels.mkdir()
    label = labels / CT.name
    shutil.copy(SAMPLE / "ct" / "labelsTr" / CT.name, label)
    before = sha(label)
    with pytest.raises(DataError, match=r"ts_ct_001.nii.gz: the output would replace an input label file") as err:
        segment_files(checkpoint, [CT], labels, "CT", labels_dir=labels, overwrite=True, log=lambda m: None)
    assert "--overwrite" not in str(err.value)
    assert sha(label) == before and sorted(p.name for p in labels.iterdir()) == [CT.name]


def test_output_folder_problems_come_before_any_work(tmp_path, checkpoint, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("segmented although --output cannot be written")
    monkeypatch.setattr(Ensemble, "segment", never)
    taken = tmp_path / "result.nii.gz"
    taken.write_bytes(b"an earlier result")
    with pytest.raises(DataError, match=f"--output {taken}: a file name, but --output is the folder"):
        segment_files(checkpoint, [CT], taken, "CT", log=lambda m: None)
    with pytest.raises(DataError, match=f"--output {taken / 'sub'}: {taken} is a file, not a folder"):
        segment_files(checkpoint, [CT], taken / "sub", "CT", log=lambda m: None)
    assert taken.read_bytes() == b"an earlier result"
    with pytest.raises(DataError, match=f"--output {tmp_path / 'pred.nii.gz'}: a file name"):  # not made a folder
        segment_files(checkpoint, [CT], tmp_path / "pred.nii.gz", "CT", log=lambda m: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(DataError, match=f"--output {tmp_path / 'new'}: cannot write in {tmp_path}"):
        segment_files(checkpoint, [CT], tmp_path / "new", "CT", log=lambda m: None)
    assert not (tmp_path / "new").exists() and not (tmp_path / "pred.nii.gz").exists()


def test_nnunet_second_channels_and_folders_without_nifti(tmp_path, checkpoint):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(CT, scans / "case_0000.nii.gz")
    shutil.copy(CT, scans / "case_0001.nii.gz")
    lines = []
    records = segment_files(checkpoint, find_inputs(scans), tmp_path / "out", "CT", log=lines.append)
    assert [Path(r["output"]).name for r in records] == ["case.nii.gz", "case_0001.nii.gz"]
    assert (f"warning: {scans / 'case_0001.nii.gz'}: segmented as a scan of its own, but beside case_0000 it may be "
            "nnU-Net's channel 0001 of one case; this model takes one channel") in lines
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    (dicom / "IM0001.dcm").write_bytes(b"DICM")
    (dicom / "1.2.840.113619.2.55.3.dcm").write_bytes(b"DICM")  # named by UID
    with pytest.raises(DataError, match=r"no .nii or .nii.gz files in this folder; .* holds 2 .dcm files, but only"):
        find_inputs(dicom)


def test_a_folder_input_skips_hidden_files(tmp_path):
    shutil.copy(CT, tmp_path / CT.name)
    (tmp_path / f"._{CT.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's resource fork copy
    (tmp_path / f".{CT.name}.tmp.nii.gz").write_bytes(b"cut short")
    assert find_inputs(tmp_path) == [tmp_path / CT.name]


def test_label_map_values_need_two_bytes_a_voxel():
    label = np.array([[[0, 1, 2, 3]]], dtype=np.uint8)
    out = outputs.to_dataset_values(label, {1: 205, 2: 500, 3: 850})
    assert out.dtype == np.uint16 and out.ravel().tolist() == [0, 205, 500, 850]
    assert outputs.to_dataset_values(label, {1: 5, 2: 6, 3: 7}).dtype == np.uint8
    assert outputs.to_dataset_values(label, {1: 70000}).ravel().tolist() == [0, 70000, 0, 0]
    assert outputs.to_dataset_values(label, None).dtype == np.uint8


def test_skip_existing_continues_an_interrupted_call(tmp_path, checkpoint, monkeypatch):
    scans, labels = tmp_path / "scans", tmp_path / "labels"
    for folder in (scans, labels):
        folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(CT, scans / name)
        shutil.copy(SAMPLE / "ct" / "labelsTr" / CT.name, labels / name)
    full = segment_files(checkpoint, find_inputs(scans), tmp_path / "full", "CT", labels_dir=labels, log=lambda m: None)
    # An interrupted call: a's outputs are there, b's are not.
    segment_files(checkpoint, [scans / "a.nii.gz"], tmp_path / "out", "CT", outputs=PREVIEW, log=lambda m: None)
    stamp = (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns
    segmented, original = [], Ensemble.segment
    monkeypatch.setattr(Ensemble, "segment", lambda self, src, *a, **k: segmented.append(src.name) or original(
        self, src, *a, **k))
    lines = []
    records = segment_files(checkpoint, find_inputs(scans), tmp_path / "out", "CT", outputs=PREVIEW, labels_dir=labels,
                            skip_existing=True, log=lines.append)
    assert segmented == ["b.nii.gz"] and (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns == stamp
    assert f"[1/2] a.nii.gz: {tmp_path / 'out' / 'a.nii.gz'} exists, skipped (--skip_existing)" in lines
    assert [r["seconds"] is None for r in records] == [True, False]
    for got, want in zip(records, full):  # a is scored from its file, as if it had been segmented now
        assert np.array_equal(got["dice"], want["dice"], equal_nan=True)
    assert (tmp_path / "out" / "metrics.csv").is_file() and (tmp_path / "out" / "b.png").is_file()
    # Nothing left to do: a second continuation segments nothing and says so in the cost line.
    segment_files(checkpoint, find_inputs(scans), tmp_path / "out", "CT", outputs=PREVIEW, labels_dir=labels,
                  skip_existing=True, log=lambda m: None)
    assert segmented == ["b.nii.gz"]
    assert "no case segmented in this call" in (tmp_path / "out" / "summary.md").read_text()


def test_skip_existing_checks_the_outputs_it_keeps_before_any_work(tmp_path, checkpoint, monkeypatch):
    # A zero-byte output was skipped without a word, and with --labels gave an ImageFileError traceback at the end.
    scans, labels, out = tmp_path / "scans", tmp_path / "labels", tmp_path / "out"
    for folder in (scans, labels, out):
        folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        shutil.copy(CT, scans / name)
        shutil.copy(SAMPLE / "ct" / "labelsTr" / CT.name, labels / name)
    (out / "a.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), out / "b.nii.gz")  # another scan's grid
    segmented, original = [], Ensemble.segment
    monkeypatch.setattr(Ensemble, "segment", lambda self, src, *a, **k: segmented.append(src.name) or original(
        self, src, *a, **k))
    lines = []
    records = segment_files(checkpoint, find_inputs(scans), out, "CT", labels_dir=labels, skip_existing=True,
                            log=lines.append)
    assert segmented == ["a.nii.gz", "b.nii.gz"] and all(r["seconds"] is not None for r in records)
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings[0].startswith(f"warning: {out / 'a.nii.gz'}: unreadable or truncated earlier output")
    assert warnings[1] == (f"warning: {out / 'b.nii.gz'}: earlier output shape (4, 4, 4) differs from scan shape "
                           f"{nib.load(str(CT)).shape} ({scans / 'b.nii.gz'}); segmented again")
    assert lines.index(warnings[1]) < min(i for i, line in enumerate(lines) if "->" in line)  # before any work
    assert nib.load(out / "a.nii.gz").shape == nib.load(out / "b.nii.gz").shape == nib.load(str(CT)).shape


def test_a_long_input_name_is_segmented_and_written(tmp_path, checkpoint):
    # 243 characters: infer.py segmented the scan, then failed on the longer name of the hidden temporary.
    scan = tmp_path / "in" / ("s" * 236 + ".nii.gz")
    scan.parent.mkdir()
    shutil.copy(CT, scan)
    code, log = run("--checkpoint", checkpoint, "--modality", "CT", "--input", scan, "--output", tmp_path / "out")
    assert code == 0, log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset.json", scan.name]


def test_a_case_killed_while_writing_leaves_nothing_that_looks_done(tmp_path, checkpoint, monkeypatch):
    # Killed while compressing the probabilities: no output under its own name, so --skip_existing redoes it.
    def killed(file, **arrays):
        Path(file).write_bytes(b"PK half an archive")
        raise KeyboardInterrupt
    monkeypatch.setattr(predict.np, "savez_compressed", killed)
    with pytest.raises(KeyboardInterrupt):
        segment_files(checkpoint, [CT], tmp_path, "CT", outputs=OutputOptions(probabilities=True, preview=True),
                      log=lambda m: None)
    # dataset.json comes first, the label map last; no temporary file left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json"]
    monkeypatch.undo()
    records = segment_files(checkpoint, [CT], tmp_path, "CT", outputs=OutputOptions(probabilities=True, preview=True),
                            skip_existing=True, log=lambda m: None)
    assert records[0]["seconds"] is not None
    with np.load(output_path(CT, tmp_path, "_probabilities.npz")) as saved:
        assert saved["probabilities"].shape[0] == 14


def test_channels_last_windows_give_the_contiguous_logits(checkpoint):
    segmenter = Segmenter(checkpoint, InferenceSettings(device="cpu", amp="none", channels_last=False))
    image, _, _ = mdata.preprocess(MR, None, "MR", **segmenter.config["preprocess"]["MR"])
    contiguous = segmenter.logits(image, "MR")
    fast = Segmenter(checkpoint, InferenceSettings(device="cpu", amp="none", channels_last=True))
    weight = next(p for p in fast.model.parameters() if p.dim() == 5 and p.shape[1] > 1)  # a 1-channel one is both
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    logits = fast.logits(image, "MR")
    # CPU BatchNorm kernels accumulate less precisely in channels_last (bench/README.md): ~1e-4 relative, not 1e-6.
    scale = contiguous.abs().max().item()
    assert logits.shape == contiguous.shape == (14, *image.shape)
    assert (logits - contiguous).abs().max().item() <= 5e-4 * scale
    assert (logits.argmax(0) == contiguous.argmax(0)).float().mean().item() > 0.999


@pytest.mark.parametrize("native, amp_dtype", [(False, None), (True, torch.bfloat16)])
def test_auto_settings_on_the_cpu(checkpoint, monkeypatch, native, amp_dtype):
    """The UNet on the CPU runs in channels_last_3d, in bf16 only where the CPU has bf16 matrix units."""
    monkeypatch.setattr(mdevice, "cpu_has_native_bf16", lambda: native)
    auto = Segmenter(checkpoint, InferenceSettings(device="cpu"))
    assert auto.amp_dtype is amp_dtype and auto.channels_last is True
    forced = Segmenter(checkpoint, InferenceSettings(device="cpu", amp="bf16", channels_last=False))
    assert forced.amp_dtype is torch.bfloat16 and forced.channels_last is False and forced.predictor is forced.model


def test_threads_are_set_before_inference(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(predict_cli, "set_threads", lambda threads: calls.append(threads))
    base = ["--checkpoint", str(tmp_path / "none.pt"), "--modality", "CT", "--input", str(CT),
            "--output", str(tmp_path / "out")]
    assert predict_cli.main(base) == 2 and predict_cli.main([*base, "--threads", "3"]) == 2  # no such checkpoint
    assert calls == [0, 3]


def test_postprocessing_and_the_outputs_that_know_their_classes(tmp_path, checkpoint):
    plain = segment_files(checkpoint, [MR], tmp_path / "plain", "MR", log=lambda m: None)
    raw = np.asanyarray(nib.load(plain[0]["output"]).dataobj)
    scan = nib.load(str(MR))
    spacing = nib.affines.voxel_sizes(scan.affine)
    out = tmp_path / "out"
    records = segment_files(checkpoint, [MR], out, "MR", log=lambda m: None, outputs=OutputOptions(
        keep_largest=[], min_component_mm3=50.0, per_class=True, statistics=True))
    label = np.asanyarray(nib.load(records[0]["output"]).dataobj)
    # The network's label map postprocessed on the scan's grid: each class one component of at least 50 mm^3.
    assert np.array_equal(label, postprocess(raw, spacing, list(range(1, 14)), 50.0))
    assert (label != raw).sum() > 0 and (label > 0).sum() > 0
    for k in np.unique(label[label > 0]):
        sizes = component_sizes(label == k)[1]
        assert len(sizes) == 2 and sizes[1] * np.prod(spacing) >= 50

    classes = load_model(checkpoint)[1]["classes"]
    description = json.loads((out / "dataset.json").read_text())
    assert description["labels"] == {name: k for k, name in enumerate(classes)} and len(classes) == 14
    assert description["modality"] == {"0": "MR"} and description["file_ending"] == ".nii.gz"
    assert description["checkpoint"] == str(checkpoint.resolve())
    assert description["settings"]["keep_largest"] == classes[1:]
    assert description["settings"]["min_component_mm3"] == 50.0
    assert description["settings"]["sliding_window"]["overlap"] == 0.5

    files = {name: out / "ts_mr_001" / f"{name.replace(' ', '_')}.nii.gz" for name in classes[1:]}
    assert sorted((out / "ts_mr_001").iterdir()) == sorted(files.values())
    assert files["right kidney"].name == "right_kidney.nii.gz"
    rebuilt = np.zeros_like(label)
    for k, name in enumerate(classes[1:], 1):
        img = nib.load(str(files[name]))
        mask = np.asanyarray(img.dataobj)
        assert img.get_data_dtype() == np.uint8 and np.array_equal(img.affine, scan.affine)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        rebuilt[mask == 1] = k
    assert np.array_equal(rebuilt, label)

    stats = json.loads((out / "ts_mr_001_statistics.json").read_text())
    image = scan.get_fdata()
    assert list(stats["classes"]) == classes[1:] and stats["voxel_size_mm"] == pytest.approx(list(spacing))
    for k, name in enumerate(classes[1:], 1):
        entry, voxels = stats["classes"][name], int((label == k).sum())
        assert entry["value"] == k and entry["voxels"] == voxels
        assert entry["volume_mm3"] == pytest.approx(voxels * np.prod(spacing))
        if voxels:
            assert entry["mean_intensity"] == pytest.approx(image[label == k].mean(), rel=1e-5)
        else:
            assert entry["mean_intensity"] is None


def test_class_statistics_by_hand():
    label = np.array([[[0, 1, 1, 2]]], np.uint8)
    image = np.array([[[10.0, 2.0, 4.0, 7.0]]], np.float32)
    stats = outputs.class_statistics(label, image, (2.0, 1.0, 0.5), ["background", "a", "b", "c"],
                                     {1: 1, 2: 205, 3: 3})
    assert stats == {"a": {"value": 1, "voxels": 2, "volume_mm3": 2.0, "mean_intensity": 3.0},
                     "b": {"value": 205, "voxels": 1, "volume_mm3": 1.0, "mean_intensity": 7.0},
                     "c": {"value": 3, "voxels": 0, "volume_mm3": 0.0, "mean_intensity": None}}


def test_skip_existing_counts_the_new_outputs_and_does_not_postprocess_again(tmp_path, checkpoint, monkeypatch):
    options = dict(outputs=OutputOptions(keep_largest=["liver"], per_class=True, statistics=True), log=lambda m: None)
    segment_files(checkpoint, [MR], tmp_path, "MR", **options)
    (tmp_path / "ts_mr_001" / "liver.nii.gz").unlink()
    with pytest.raises(DataError) as error:  # every output that exists is named
        segment_files(checkpoint, [MR], tmp_path, "MR", **options)
    for path in (tmp_path / "dataset.json", output_path(MR, tmp_path), tmp_path / "ts_mr_001_statistics.json",
                 tmp_path / "ts_mr_001" / "spleen.nii.gz"):
        assert f"{path}: exists; pass --overwrite" in str(error.value)
    assert len(error.value.problems) == 1 + 1 + 1 + 12  # dataset.json, label map, statistics, 12 class files
    calls, original = [], predict.postprocess
    monkeypatch.setattr(predict, "postprocess", lambda *a: calls.append(a[2]) or original(*a))
    segment_files(checkpoint, [MR], tmp_path, "MR", skip_existing=True, **options)  # a class file is missing
    assert calls == [[6]] and (tmp_path / "ts_mr_001" / "liver.nii.gz").is_file()
    segment_files(checkpoint, [MR], tmp_path, "MR", skip_existing=True, **options)
    assert calls == [[6]]  # complete: neither segmented nor postprocessed again


def test_a_datasets_own_dataset_json_is_never_replaced(tmp_path, checkpoint):
    datalist = {"training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    with pytest.raises(DataError, match="dataset.json: not written by infer.py") as error:
        segment_files(checkpoint, [MR], tmp_path, "MR", overwrite=True, log=lambda m: None)
    assert len(error.value.problems) == 1
    assert json.loads((tmp_path / "dataset.json").read_text()) == datalist and not output_path(MR, tmp_path).exists()


def test_bad_postprocessing_flags_exit_2_before_any_work(tmp_path, checkpoint, capsys):
    base = ["--checkpoint", str(checkpoint), "--modality", "MR", "-i", str(MR), "-o", str(tmp_path / "out")]
    assert predict_cli.main([*base, "--keep_largest", "liver", "livr"]) == 2
    assert "--keep_largest livr: not a class of this checkpoint" in capsys.readouterr().err
    assert predict_cli.main([*base, "--min_component_mm3", "0"]) == 2
    assert "--min_component_mm3 0.0: must be a volume above 0 mm^3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_names_the_complete_cases_and_how_to_continue(tmp_path, checkpoint, monkeypatch, capsys):
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        shutil.copy(MR, scans / name)
    original = Ensemble.segment

    def interrupted_at_b(self, src, *args, **kwargs):
        if src.name == "b.nii.gz":
            raise KeyboardInterrupt
        return original(self, src, *args, **kwargs)

    monkeypatch.setattr(Ensemble, "segment", interrupted_at_b)
    args = ["--checkpoint", str(checkpoint), "--modality", "MR", "-i", str(scans), "-o", str(out)]
    assert predict_cli.main(args) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"\ninterrupted; 1 of 3 cases are complete in {out} (a.nii.gz); run the same command with "
                        "--skip_existing to segment the other 2\n") and "Traceback" not in err
    assert predict_cli.main([*args, "--overwrite"]) == 130
    assert "run the same command with --skip_existing instead of --overwrite" in capsys.readouterr().err
    monkeypatch.undo()
    assert predict_cli.main([*args, "--skip_existing"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "dataset.json"]


# ---------------------------------------------------------------------------------------------- ensembles and parts


def variant(checkpoint: Path, path: Path, seed: int, **preprocess) -> Path:
    """A copy of ``checkpoint`` with its weights moved by seeded noise (another model of the same task),
    and ``preprocess`` settings changed for every modality."""
    ckpt = torch.load(checkpoint, weights_only=False)
    gen = torch.Generator().manual_seed(seed)
    for name, value in ckpt["model"].items():
        if value.is_floating_point() and "running" not in name:
            value += 0.3 * value.std().nan_to_num() * torch.randn(value.shape, generator=gen)
    for settings in ckpt["config"]["preprocess"].values():
        settings.update(preprocess)
    torch.save(ckpt, path)
    return path


def saved_probabilities(out: Path, scan: Path) -> np.ndarray:
    with np.load(output_path(scan, out, "_probabilities.npz")) as saved:
        return saved["probabilities"]


def test_an_ensemble_averages_the_softmax_of_its_models(tmp_path, checkpoint):
    other = variant(checkpoint, tmp_path / "b.pt", seed=1)
    quiet = {"outputs": OutputOptions(probabilities=True), "log": lambda m: None}
    segment_files([checkpoint, other], [MR], tmp_path / "both", "MR", **quiet)
    ensemble = saved_probabilities(tmp_path / "both", MR)
    # By hand: the two models' softmax on the training grid, averaged, restored as for one model.
    a, b = Segmenter(checkpoint), Segmenter(other)
    image, _, meta = mdata.preprocess(MR, None, "MR", **a.config["preprocess"]["MR"])
    pa, pb = a.softmax(image, "MR"), b.softmax(image, "MR")
    assert np.abs(pa - pb).max() > 5e-3  # two different models (after one epoch, both near uniform)
    assert np.array_equal(ensemble, mdata.restore_probabilities((pa + pb) / 2, meta))
    assert np.array_equal(np.asanyarray(nib.load(str(output_path(MR, tmp_path / "both"))).dataobj),
                          mdata.restore_argmax((pa + pb) / 2, meta))
    # Restoring is linear, so this is also the mean of what each model alone saves.
    for name, ckpt in (("a", checkpoint), ("b", other)):
        segment_files(ckpt, [MR], tmp_path / name, "MR", **quiet)
    alone = [saved_probabilities(tmp_path / n, MR).astype(np.float32) for n in ("a", "b")]
    assert np.abs(ensemble.astype(np.float32) - (alone[0] + alone[1]) / 2).max() <= 1e-3  # float16 rounding
    assert min(np.abs(ensemble.astype(np.float32) - one).max() for one in alone) > 2e-3  # neither model alone
    # An ensemble of one is the model itself.
    assert np.array_equal(alone[0], mdata.restore_probabilities(pa, meta).astype(np.float32))
    description = json.loads((tmp_path / "both" / "dataset.json").read_text())
    assert description["checkpoint"] == [str(checkpoint.resolve()), str(other.resolve())]


def test_an_ensemble_of_other_grids_averages_on_the_scans_grid(tmp_path, checkpoint):
    coarse = variant(checkpoint, tmp_path / "coarse.pt", seed=2, spacing=[8.0, 8.0, 8.0])
    segment_files([checkpoint, coarse], [MR], tmp_path / "both", "MR", outputs=OutputOptions(probabilities=True),
                  log=lambda m: None)
    probs = saved_probabilities(tmp_path / "both", MR).astype(np.float32)
    restored = []
    for ckpt in (checkpoint, coarse):
        segmenter = Segmenter(ckpt)
        image, _, meta = mdata.preprocess(MR, None, "MR", **segmenter.config["preprocess"]["MR"])
        restored.append(mdata.restore_probabilities(segmenter.softmax(image, "MR"), meta, np.float32))
    assert restored[0].shape == restored[1].shape == probs.shape == (14, *nib.load(str(MR)).shape)
    mean = (restored[0] + restored[1]) / 2
    assert np.abs(probs - mean).max() <= 1e-3  # float16
    label = np.asanyarray(nib.load(str(output_path(MR, tmp_path / "both"))).dataobj)
    assert np.array_equal(label, mean.argmax(0))


def test_an_ensemble_of_other_tasks_is_refused_before_any_scan_is_read(tmp_path, checkpoint, capsys):
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["config"]["classes"] = [*ckpt["config"]["classes"][:-1], "bladder"]
    torch.save(ckpt, tmp_path / "classes.pt")
    ckpt = torch.load(checkpoint, weights_only=False)
    del ckpt["config"]["preprocess"]["CT"]
    torch.save(ckpt, tmp_path / "mr_only.pt")
    for other, what in (("classes.pt", "'duodenum'] for ['CT', 'MR'], but"), ("mr_only.pt", "for ['MR']")):
        code = predict_cli.main(["--checkpoint", str(checkpoint), str(tmp_path / other), "--modality", "MR",
                                 "--input", str(MR), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "an ensemble's checkpoints must segment the same classes of the same modalities" in err
        assert what in err and f"{tmp_path / other} has 14 classes" in err
        assert not (tmp_path / "out").exists()


def test_input_share_splits_the_sorted_names_without_overlap():
    inputs = [Path(f"/d/{name}.nii.gz") for name in ("e", "a", "d", "b", "c")]
    parts = [input_share(inputs, 2, i) for i in range(2)]
    assert [[p.stem for p in part] for part in parts] == [["a.nii", "c.nii", "e.nii"], ["b.nii", "d.nii"]]
    assert input_share(inputs[::-1], 2, 1) == parts[1]  # the same share whatever order the list came in
    with pytest.raises(ValueError, match=re.escape("--num_parts 2 --part_id 2: need --num_parts >= 1")):
        input_share(inputs, 2, 2)


def test_two_parts_write_exactly_what_one_call_writes(tmp_path, checkpoint, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("s1", "s2", "s3"):
        (scans / f"{name}.nii.gz").symlink_to(MR)
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in ("s1", "s2", "s3"):
        (labels / f"{name}.nii.gz").symlink_to(SAMPLE / "mr" / "labelsTr" / "ts_mr_001.nii.gz")
    base = ["--checkpoint", str(checkpoint), "--modality", "MR", "--input", str(scans), "--statistics"]
    assert predict_cli.main([*base, "--output", str(tmp_path / "one")]) == 0
    for part in ("1", "0"):  # in either order, into one folder, without --overwrite
        assert predict_cli.main([*base, "--output", str(tmp_path / "parts"), "--num_parts", "2",
                                 "--part_id", part]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert names == ["dataset.json", *[f"s{i}{end}" for i in (1, 2, 3) for end in (".nii.gz", "_statistics.json")]]
    for name in names:
        one, parts = tmp_path / "one" / name, tmp_path / "parts" / name
        if name.endswith(".nii.gz"):
            assert np.array_equal(np.asanyarray(nib.load(str(one)).dataobj),
                                  np.asanyarray(nib.load(str(parts)).dataobj))
        else:
            assert one.read_text() == parts.read_text()
    capsys.readouterr()
    assert predict_cli.main([*base, "--output", str(tmp_path / "parts"), "--num_parts", "2",
                             "--labels", str(labels)]) == 2
    assert "--labels with --num_parts 2: a part sees only its share" in capsys.readouterr().err
    # With every part done, a last call scores the folder without segmenting again.
    assert predict_cli.main([*base, "--output", str(tmp_path / "parts"), "--skip_existing",
                             "--labels", str(labels)]) == 0
    assert "skipped (--skip_existing)" in capsys.readouterr().err
    assert (tmp_path / "parts" / "metrics.csv").read_text().count("\ns") == 3


def test_labels_of_a_partially_labelled_dataset_score_only_what_it_labels(tmp_path, checkpoint):
    # A CHAOS-like dataset: the CT's label keeps spleen and liver, and its dataset.json (above labelsTr) says so.
    label = nib.load(SAMPLE / "ct" / "labelsTr" / "ts_ct_001.nii.gz")
    values = np.asarray(label.dataobj)
    (tmp_path / "ds" / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.where(np.isin(values, [1, 6]), values, 0).astype(np.uint8), label.affine),
             tmp_path / "ds" / "labelsTr" / "ts_ct_001.nii.gz")
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen",
                                                                         "6": "liver"}}))
    records = segment_files(checkpoint, [CT], tmp_path / "out", "CT", labels_dir=tmp_path / "ds" / "labelsTr",
                            log=lambda m: None)
    full = segment_files(checkpoint, [CT], tmp_path / "full", "CT", labels_dir=SAMPLE / "ct" / "labelsTr",
                         log=lambda m: None)
    scored = [k for k, v in enumerate(records[0]["dice"], 1) if not np.isnan(v)]
    assert scored == [1, 6] and records[0]["labelled"].tolist() == [k in (1, 6) for k in range(1, 14)]
    assert [records[0]["dice"][k - 1] for k in scored] == [full[0]["dice"][k - 1] for k in scored]
    header, cells = [row.split(",") for row in (tmp_path / "out" / "metrics.csv").read_text().splitlines()]
    assert cells[header.index("stomach")] == "not labelled" and cells[header.index("liver")] != "not labelled"
    # --labelled names the classes instead.
    code, log = run("--checkpoint", checkpoint, "--modality", "CT", "--input", CT.parent, "--output", tmp_path / "o2",
                    "--labels", tmp_path / "ds" / "labelsTr", "--labelled", "liver")
    assert code == 3 and "class values [1] are classes its dataset does not label (it labels liver)" in log
