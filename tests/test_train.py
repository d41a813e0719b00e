"""The trainer: exact resume after SIGKILL, NaN stop, DDP on gloo, the run folder, case selection and folds."""

import csv
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mulmodseg import data as mdata
from mulmodseg import device as mdevice
from mulmodseg.alt import warmup_cosine
from mulmodseg.augment import NnUNetAugment
from mulmodseg.checkpoint import load_checkpoint
from mulmodseg.cli import train as train_cli  # what train.py runs: its main, and the names main looks up
from mulmodseg.config import TrainConfig, TrainingError, check_config, saved_config
from mulmodseg.model import MulModSeg
from mulmodseg.runlog import trim_log, write_curves
from mulmodseg.text.prompts import resolve_classes
from mulmodseg.training import Trainer
from mulmodseg.viz import read_png

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
# A small but real run: a narrow UNet on 32^3 crops of the bundled CT and MR resampled to 6 mm.
SMALL = ["--backbone", "unet", "--base_channels", "4", "--text", "onehot", "--roi_size", "32",
         "--spacing", "6", "6", "6", "--num_workers", "0", "--warmup_epochs", "1", "--lr", "1e-3"]


def small_args(out: Path, cache: Path, epochs: int) -> list[str]:
    return ["--ct_dir", str(SAMPLE / "ct"), "--mr_dir", str(SAMPLE / "mr"), *SMALL, "--epochs", str(epochs),
            "--out", str(out), "--cache_dir", str(cache)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_resume_after_sigkill_gives_the_same_weights_as_a_straight_run(tmp_path, cache):
    straight = run_cli(small_args(tmp_path / "straight", cache, 2))
    log = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, log
    assert "ETA" in log

    killed_dir = tmp_path / "killed"
    proc = run_cli(small_args(killed_dir, cache, 2))
    deadline = time.time() + 600
    while not (killed_dir / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # during the second epoch: last.pt holds epoch 1
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(killed_dir / "last.pt")["epoch"] == 1

    # An occupied run directory is not silently reused.
    again = run_cli(small_args(killed_dir, cache, 2))
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 2 and "--resume" in out

    resumed = run_cli(small_args(killed_dir, cache, 2) + ["--resume"])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(killed_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    lines = [json.loads(line) for line in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"CT/dice_loss", "MR/ce_loss"} <= set(lines[-1])
    assert (killed_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (killed_dir / "curves.png").unlink()
    assert train_cli.main(["--out", str(killed_dir), "--plot_only"]) == 0
    assert read_png(killed_dir / "curves.png").shape == (360, 640, 3)
    config = json.loads((killed_dir / "config.json").read_text())
    assert config["modalities"] == ["CT", "MR"] and config["train"]["roi_size"] == [32, 32, 32]
    # The window size is stored once: inference pads to it from "train" (predict.load_model).
    assert "roi_size" not in config and not any("min_size" in s for s in config["preprocess"].values())


def test_ctrl_c_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cli, "train", interrupted)
    out = tmp_path / "run"
    assert train_cli.main(small_args(out, tmp_path / "cache", 1)) == 130
    assert capsys.readouterr().err.endswith("interrupted; no checkpoint was written yet\n")
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": 1}\n')  # killed after an epoch, before its last.pt (--save_every 2)
    assert train_cli.main(small_args(out, tmp_path / "cache", 1)) == 130
    assert capsys.readouterr().err.endswith(
        f"interrupted; no last.pt was written yet; delete log.jsonl in {out} (or choose another --out) "
        "to start again\n")
    (out / "last.pt").write_bytes(b"")
    assert train_cli.main(small_args(out, tmp_path / "cache", 1)) == 130
    assert f"interrupted; {out / 'last.pt'} holds the last saved epoch: run the same command with --resume" in (
        capsys.readouterr().err)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, cache):
    args = train_cli.build_parser().parse_args(small_args(tmp_path / "run", cache, 1))
    trainer = Trainer(train_cli.config_from_args(args), log=lambda msg: None)
    trainer.prepare()
    trainer.fit()
    before = load_checkpoint(tmp_path / "run" / "last.pt")
    trainer.config.epochs = 2
    with torch.no_grad():
        trainer.model.precls_conv[2].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 2, step 1 \(CT\): loss is nan.*last\.pt"):
        trainer.fit()
    after = load_checkpoint(tmp_path / "run" / "last.pt")
    assert after["epoch"] == 1
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_bad_input_fails_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(["--ct_dir", str(empty), "--mr_dir", str(SAMPLE / "mr"), *SMALL, "--out", str(tmp_path / "r")])
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3  # a data problem (DataError), not a bad flag
    assert str(empty) in out
    assert not (tmp_path / "r").exists()


DDP_SCRIPT = """
import os, sys, torch
from mulmodseg.cli import train as cli
from mulmodseg.training import Trainer
args = cli.build_parser().parse_args(sys.argv[1:])
trainer = Trainer(cli.config_from_args(args), log=lambda m: None)
trainer.prepare()
before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
trainer.fit()
torch.save({"before": before, "after": trainer.model.state_dict()},
           os.path.join(args.out, f"rank{os.environ['RANK']}.pt"))
torch.distributed.destroy_process_group()
"""


def test_ddp_on_gloo_keeps_both_ranks_identical(tmp_path, cache, free_port):
    out = tmp_path / "ddp"
    out.mkdir()
    args = small_args(out, cache, 1) + ["--device", "cpu", "--val_fraction", "0"]
    port = free_port
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in range(2))
    params = [name for name, _ in
              MulModSeg.from_config(load_checkpoint(out / "last.pt")["config"]["model"]).named_parameters()]
    assert len(params) > 50
    for key in params:
        assert torch.equal(r0["after"][key], r1["after"][key]), key
    assert any(not torch.equal(r0["before"][k], r0["after"][k]) for k in params)
    # BatchNorm running statistics are per rank between forwards (DDP broadcasts rank 0's at each
    # forward); checkpoints hold rank 0's.


def test_swin_on_single_voxel_bottleneck_crops_is_warned_about(tmp_path, cache):
    messages = []
    args = ["--ct_dir", str(SAMPLE / "ct"), *SMALL, "--mode", "CT", "--epochs", "1", "--out", str(tmp_path / "r"),
            "--cache_dir", str(cache)]
    for backbone, warned in (("unet", False), ("swinunetr", True)):
        config = train_cli.config_from_args(train_cli.build_parser().parse_args(args + ["--backbone", backbone,
                                                                                        "--feature_size", "12"]))
        messages.clear()
        Trainer(config, log=messages.append).prepare()
        assert any("encoder10 learns nothing" in m for m in messages) == warned


def test_warp_modalities_limits_rotation_and_scaling_to_the_named_ones(tmp_path, cache):
    args = small_args(tmp_path / "r", cache, 1) + ["--rotate_degrees", "6", "--scale_range", "0.1"]
    for extra, expected in (([], {"CT": 6.0, "MR": 6.0}), (["--warp_modalities", "CT"], {"CT": 6.0, "MR": 0.0})):
        trainer = Trainer(train_cli.config_from_args(train_cli.build_parser().parse_args(args + extra)),
                          log=lambda m: None)
        trainer.prepare()
        datasets = {name: loader.dataset for name, loader in trainer.loaders.items()}
        assert {n: d.rotate_degrees for n, d in datasets.items()} == expected
        assert {n: d.scale_range for n, d in datasets.items()} == {n: v / 60 for n, v in expected.items()}
        assert {d.warp_prob for d in datasets.values()} == {1.0}  # every crop, as the reference's RandAffine
    with pytest.raises(TrainingError, match="--warp_modalities PET: no modality 'PET'"):
        check_config(TrainConfig(data_dirs={"CT": "x"}, warp_modalities=["PET"]))
    with pytest.raises(TrainingError, match=r"--warp_prob must be in \[0, 1\], got 1.5"):
        check_config(TrainConfig(data_dirs={"CT": "x"}, warp_prob=1.5))


def test_gradient_checkpointing_reaches_the_swin_blocks(tmp_path, cache):
    args = small_args(tmp_path / "r", cache, 1) + ["--gradient_checkpointing", "--feature_size", "12"]
    args[args.index("unet")] = "swinunetr"
    trainer = Trainer(train_cli.config_from_args(train_cli.build_parser().parse_args(args)), log=lambda m: None)
    trainer.prepare()
    blocks = [m for m in trainer.model.modules() if hasattr(m, "use_checkpoint")]
    assert trainer.model.gradient_checkpointing and len(blocks) == 8 and all(m.use_checkpoint for m in blocks)


def test_trim_log_drops_the_epochs_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "CT/dice_loss": 0.5}) + "\n" for e in (1, 2, 3)) + '{"epoch": 4, "C')
    write_curves(log, tmp_path / "curves.png")  # a line torn mid-write (or being written) is skipped
    assert read_png(tmp_path / "curves.png").shape == (360, 640, 3)
    trim_log(log, 2)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]
    trim_log(tmp_path / "absent.jsonl", 1)
    assert not (tmp_path / "absent.jsonl").exists()


def test_resume_with_only_out_keeps_the_saved_settings_and_follows_the_new_schedule(tmp_path, cache, capsys):
    run = tmp_path / "run"
    assert train_cli.main(small_args(run, cache, 2)) == 0
    capsys.readouterr()
    assert train_cli.main(["--out", str(run), "--resume", "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert "bundled sample" not in err and "at epoch 3/3" in err
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 3 and tuple(ckpt["config"]["train"]["roi_size"]) == (32, 32, 32)
    assert ckpt["config"]["train"]["cache_dir"] == str(cache) and ckpt["config"]["train"]["epochs"] == 3
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # The saved optimizer held lr 0 (the end of the 2-epoch schedule); epoch 3 of 3 follows the new one.
    assert records[2]["lr"] == pytest.approx(1e-3 * warmup_cosine(2, 1, 3)) and records[2]["lr"] > 0
    code = train_cli.main(["--out", str(run), "--resume", "--epochs", "4", "--roi_size", "64"])
    assert code == 2 and "roi_size: saved (32, 32, 32), given (64, 64, 64)" in capsys.readouterr().err
    # Nothing left to train: said at once, and config.json keeps the run's own epochs.
    for epochs in ("3", "2"):
        assert train_cli.main(["--out", str(run), "--resume", "--epochs", epochs]) == 2
        assert f"has finished 3 of {epochs} epochs; pass --epochs above 3" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3


def test_a_run_resumes_from_any_folder_and_paths_compare_by_location(tmp_path, cache, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    relative = os.path.relpath(SAMPLE, tmp_path / "a")
    args = small_args(tmp_path / "run", cache, 1)
    args[args.index(str(SAMPLE / "ct"))] = f"{relative}/ct"
    args[args.index(str(SAMPLE / "mr"))] = f"./{relative}/mr/"
    assert train_cli.main(args) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["data_dirs"]
    assert saved == {"CT": [str(SAMPLE / "ct")], "MR": [str(SAMPLE / "mr")]}
    monkeypatch.chdir(tmp_path)  # elsewhere, with the folders spelled another way
    capsys.readouterr()
    assert train_cli.main(["--out", str(tmp_path / "run"), "--resume", "--epochs", "2",
                           "--ct_dir", str(SAMPLE / "ct") + "/", "--mr_dir", os.path.relpath(SAMPLE / "mr")]) == 0
    assert "at epoch 2/2" in capsys.readouterr().err


def test_a_run_saved_with_relative_paths_resumes_with_the_same_flags(tmp_path, cache, monkeypatch):
    # Older versions saved the folders as typed: such a run still resumes from the folder it was started in.
    monkeypatch.chdir(SAMPLE.parent)
    args = small_args(tmp_path / "run", cache, 1)
    args[args.index(str(SAMPLE / "ct"))], args[args.index(str(SAMPLE / "mr"))] = "sample/ct", "sample/mr"
    assert train_cli.main(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    ckpt["config"]["train"]["data_dirs"] = {"CT": "sample/ct", "MR": "sample/mr"}
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert train_cli.main([*args, "--resume", "--epochs", "2"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_a_format_1_checkpoint_resumes_with_the_settings_its_run_had(tmp_path, cache):
    """Format 1 took settings in as they came: a file without one ran as that setting's old behaviour says."""
    args = small_args(tmp_path / "run", cache, 1)
    assert train_cli.main(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    ckpt["format_version"] = 1
    for name in ("warp_prob", "norm_stats", "positive_centres", "channels_last"):
        del ckpt["config"]["train"][name]
    del ckpt["cases"]  # saved since late in format 1
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    assert train_cli.main([*args, "--resume", "--epochs", "2"]) == 0
    train = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert [train[name] for name in ("warp_prob", "norm_stats", "positive_centres", "channels_last")] == [
        0.5, "shared", "voxel", False]
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    assert resumed["format_version"] == 2 and resumed["epoch"] == 2 and resumed["cases"]["CT"]["train"] == ["ts_ct_001"]


def test_resume_refuses_scans_added_to_the_folder_since(tmp_path, cache, capsys):
    data = tmp_path / "ct"
    shutil.copytree(SAMPLE / "ct", data)
    args = small_args(tmp_path / "run", cache, 1)
    args[args.index(str(SAMPLE / "ct"))] = str(data)
    assert train_cli.main(args) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["cases"]["CT"] == {"train": ["ts_ct_001"], "val": []}
    for folder in ("imagesTr", "labelsTr"):
        shutil.copy(data / folder / "ts_ct_001.nii.gz", data / folder / "ts_ct_002.nii.gz")
    capsys.readouterr()
    assert train_cli.main([*args, "--resume", "--epochs", "2"]) == 2
    assert (f"--resume: the CT training scans differ from the saved run's (1 new: ts_ct_002): were files added to "
            f"or removed from {data}?") in capsys.readouterr().err


def test_a_run_with_a_table_file_resumes_without_it(tmp_path, cache):
    from mulmodseg.text import EmbeddingTable
    table = tmp_path / "table.pt"
    EmbeddingTable.onehot(("CT", "MR"), tuple(resolve_classes("amos"))).save(table)
    args = small_args(tmp_path / "run", cache, 1)
    args[args.index("onehot")] = str(table)
    assert train_cli.main(args) == 0
    table.unlink()  # the table lives on in last.pt
    assert train_cli.main(["--out", str(tmp_path / "run"), "--resume", "--epochs", "2"]) == 0


def test_a_modality_left_without_training_scans_stops_before_any_work(tmp_path, cache, capsys):
    out = tmp_path / "run"
    code = train_cli.main(small_args(out, cache, 1) + ["--val_fraction", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "no scans left to train on: 1 in" in err and "held out by --val_fraction 0.5" in err
    assert not out.exists()


def test_validation_that_would_hold_out_nothing_stops_before_any_work(tmp_path, cache, capsys):
    out = tmp_path / "run"
    code = train_cli.main(small_args(out, cache, 1) + ["--val_fraction", "0.2", "--val_every", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--val_every 1: --val_fraction 0.2 holds out no scan of 1 CT, 1 MR" in err
    assert not out.exists()


def test_max_cases_counts_training_scans_after_the_validation_split(tmp_path):
    data = tmp_path / "ct"
    for i in range(8):
        for folder in ("imagesTr", "labelsTr"):
            path = data / folder / f"case_{i:03d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume(folder), np.eye(4)), path)
    config = TrainConfig(data_dirs={"CT": str(data)}, val_fraction=0.5, max_cases={"CT": 3}, text="onehot",
                         out=str(tmp_path / "r"))
    trainer = Trainer(config, log=lambda m: None)
    trainer.setup_data = trainer.setup_optimisation = lambda: None  # the case lists are what is tested
    trainer.build_model = lambda table: None
    trainer.prepare()
    assert len(trainer.cases["CT"]) == 3 and len(trainer.val_cases["CT"]) == 4
    assert not {c.id for c in trainer.cases["CT"]} & {c.id for c in trainer.val_cases["CT"]}


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_epochs(tmp_path, cache, capsys):
    # A run killed before its first last.pt (e.g. --save_every 3, stopped in epoch 3) leaves log.jsonl.
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (out / "epoch_2.pt").write_bytes(b"")
    assert train_cli.main(small_args(out, cache, 1)) == 2
    assert (f"{out} holds files of an earlier run (log.jsonl, epoch_2.pt) but no last.pt to resume from"
            in capsys.readouterr().err)
    assert (out / "log.jsonl").read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


@pytest.mark.parametrize("flags, message", [
    (["--max_cases", "CT=abc"], "--max_cases CT=abc: 'abc' is not a valid int"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--backbone", "swinunetr", "--feature_size", "13"], "--feature_size must be a positive multiple of 12"),
    (["--base_channels", "0"], "--base_channels must be >= 1, got 0"),
    (["--classes", "nosuch"], "--classes nosuch: unknown class set 'nosuch'"),
    (["--label_map", "1:x"], "--label_map 1:x: could not convert string to float: 'x'"),
    (["--roi_size", "32", "32"], "--roi_size takes one or three numbers, got [32, 32]"),
    (["--text", "one-hot"], "--text one-hot: neither clip, onehot nor none, and no such table file"),
])
def test_bad_flag_values_are_one_line_errors_before_any_work(tmp_path, cache, capsys, flags, message):
    out = tmp_path / "run"
    assert train_cli.main(small_args(out, tmp_path / "cache", 1) + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_an_out_that_cannot_be_written_stops_before_any_work(tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    # 3, a problem with the folders given, as in infer.py and evaluate.
    assert train_cli.main(small_args(taken / "run", tmp_path / "cache", 1)) == 3
    assert f"--out {taken / 'run'}: {taken} is a file, not a folder; choose another --out" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, even for root
    assert train_cli.main(small_args(tmp_path / "run", tmp_path / "elsewhere", 1)) == 3
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'run'}: cannot write in {tmp_path}" in err
    assert "--cache_dir" not in err  # a shared cache may be read-only: only missing entries need writing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing read, nothing written


def test_a_read_only_shared_cache_serves_its_entries(tmp_path, cache, monkeypatch, capsys):
    assert train_cli.main(small_args(tmp_path / "first", cache, 1)) == 0  # fills the cache
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(cache)))
    assert train_cli.main(small_args(tmp_path / "second", cache, 1)) == 0
    from mulmodseg.data import cache as cache_module

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cache_module.VolumeCache, "_write", read_only)
    data = tmp_path / "ct"
    shutil.copytree(SAMPLE / "ct", data)
    with open(data / "imagesTr" / "ts_ct_001.nii.gz", "ab") as f:
        f.write(b"\0")  # other bytes: another cache entry
    args = small_args(tmp_path / "third", cache, 1)
    args[args.index(str(SAMPLE / "ct"))] = str(data)
    capsys.readouterr()
    assert train_cli.main(args) == 3  # DataError
    assert f"{cache}: cannot add {data / 'imagesTr' / 'ts_ct_001.nii.gz'} to this cache (Permission denied); pass a " \
           "--cache_dir you can write" in capsys.readouterr().err


def test_a_training_scan_without_a_label_is_reported_before_preprocessing(tmp_path, capsys):
    data = tmp_path / "ct"
    (data / "imagesTr").mkdir(parents=True)
    shutil.copy(SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz", data / "imagesTr" / "a.nii.gz")
    (data / "dataset.json").write_text(json.dumps({"training": [{"image": "imagesTr/a.nii.gz"}]}))
    code = train_cli.main(["--ct_dir", str(data), *SMALL, "--mode", "CT", "--epochs", "1",
                           "--out", str(tmp_path / "r")])
    assert code == 3 and f"{data / 'imagesTr' / 'a.nii.gz'}: no label file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_validation_keeps_the_best_checkpoint_and_logs_dice(tmp_path, cache):
    """Two copies of the sample CT: one trains, one validates."""
    data = tmp_path / "ct"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for name in ("a", "b"):
            (data / sub / f"{name}.nii.gz").symlink_to(SAMPLE / "ct" / sub / "ts_ct_001.nii.gz")
    args = ["--ct_dir", str(data), *SMALL, "--epochs", "2", "--out", str(tmp_path / "run"), "--cache_dir", str(cache),
            "--val_fraction", "0.5", "--val_every", "1", "--mode", "CT"]
    assert train_cli.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["CT/val_dice"] <= 1.0 and len(r["CT/val_dice_per_class"]) == 13 for r in records)
    assert "MR/dice_loss" not in records[0]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["best"] == max(r["CT/val_dice"] for r in records)


def test_mix_mode_trains_on_mixed_batches(tmp_path, cache):
    args = small_args(tmp_path / "run", cache, 1) + ["--mode", "mix", "--batch_size", "2", "--amp", "bf16"]
    assert train_cli.main(args) == 0
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert record["iteration"] == 1  # one batch holding the CT and the MR volume
    assert np.isfinite(record["mix/dice_loss"]) and "CT/dice_loss" not in record


def test_help_explains_every_flag():
    text = train_cli.build_parser().format_help()
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "(default: OUT/cache)" in " ".join(text.split()) and "(default: 1000)" in text
    for flag in ("--ct_dir", "--mr_dir", "--backbone", "--text", "--clip_weights", "--template", "--classes", "--mode",
                 "--roi_size", "--batch_size", "--epochs", "--out", "--resume", "--seed", "--device"):
        assert flag in text


def test_text_clip_offline_without_weights_stops_at_once(tmp_path, monkeypatch, capsys):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache: nothing downloaded before
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    args = small_args(tmp_path / "run", tmp_path / "cache", 1)
    args[args.index("onehot")] = "clip"
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--clip_weights" in err and "--text onehot" in err
    assert not (tmp_path / "cache").exists()  # stopped before any preprocessing


def test_text_clip_builds_the_table_from_given_weights_and_caches_it(tmp_path, cache, monkeypatch):
    from mulmodseg import text
    from mulmodseg.text.clip import CLIPTextEncoder, TextConfig

    torch.manual_seed(0)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(CLIPTextEncoder(TextConfig(width=64, layers=2, heads=1, embed_dim=32)).state_dict(), weights)
    args = small_args(tmp_path / "run", cache, 1)
    args[args.index("onehot")] = "clip"
    args += ["--clip_weights", str(weights), "--template", "v2"]
    assert train_cli.main(args) == 0
    table = load_checkpoint(tmp_path / "run" / "last.pt")["model"]["text_embeddings"]
    expected = text.build_embedding_table(text.load_text_encoder(weights), "amos", ["CT", "MR"], "v2").embeddings
    assert table.shape == (2, 14, 32) and torch.allclose(table, expected, atol=1e-6)
    # --clip_activation reaches the tower and is part of the cache key: not the quick_gelu table again
    assert train_cli.main([*args, "--clip_activation", "gelu", "--out", str(tmp_path / "gelu")]) == 0
    gelu = load_checkpoint(tmp_path / "gelu" / "last.pt")["model"]["text_embeddings"]
    encoder = text.load_text_encoder(weights, activation="gelu")
    assert torch.allclose(gelu, text.build_embedding_table(encoder, "amos", ["CT", "MR"], "v2").embeddings, atol=1e-6)
    assert not torch.allclose(gelu, table, atol=1e-3)

    def unavailable(*a, **k):
        raise AssertionError("the cached table should be used")

    monkeypatch.setattr(text, "load_text_encoder", unavailable)
    args[args.index(str(tmp_path / "run"))] = str(tmp_path / "again")
    assert train_cli.main(args) == 0
    assert torch.equal(load_checkpoint(tmp_path / "again" / "last.pt")["model"]["text_embeddings"], table)


def test_fp16_autocast_uses_a_grad_scaler_that_is_checkpointed(tmp_path, cache):
    assert train_cli.main(small_args(tmp_path / "run", cache, 1) + ["--amp", "fp16"]) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["scaler"]["scale"] > 1.0  # the scaler ran (bf16 and fp32 runs keep it disabled and empty)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("native, amx, amp_dtype", [(False, False, None), (True, False, None),
                                                   (True, True, torch.bfloat16)])
def test_a_cpu_run_picks_bf16_by_the_cpu_and_channels_last_for_the_unet(tmp_path, monkeypatch, native, amx,
                                                                        amp_dtype):
    # Training in bf16 needs AMX (device.cpu_trains_in_bf16); AVX512-BF16 alone trains in fp32.
    monkeypatch.setattr(mdevice, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(mdevice, "cpu_trains_in_bf16", lambda: amx)
    args = small_args(tmp_path / "r", tmp_path / "cache", 1) + ["--device", "cpu"]
    for flags, setting, channels_last in (([], None, True), (["--channels_last", "off"], False, False),
                                          (["--channels_last"], True, True)):
        config = train_cli.config_from_args(train_cli.build_parser().parse_args(args + flags))
        assert config.channels_last is setting
        trainer = Trainer(config, log=lambda m: None)
        trainer.setup_data = trainer.setup_optimisation = lambda: None  # the precision and layout are what is tested
        trainer.prepare()
        assert trainer.amp_dtype is amp_dtype and trainer.channels_last is channels_last
        weight = next(p for p in trainer.model.parameters() if p.dim() == 5 and p.shape[1] > 1)
        assert weight.is_contiguous(memory_format=torch.channels_last_3d) is channels_last


def test_channels_last_of_saved_runs_and_resumes():
    old = {"format_version": 1, "config": {"train": {"epochs": 3}}}
    assert saved_config(old).channels_last is False  # runs from before the setting: contiguous
    assert TrainConfig.from_dict(dataclasses.asdict(TrainConfig())).channels_last is None
    assert "channels_last" not in train_cli.given_fields([])  # a resumed run keeps its saved layout
    assert "channels_last" in train_cli.given_fields(["--channels_last", "off"])
    with pytest.raises(TrainingError, match="--channels_last 'on': choose auto, on or off"):
        check_config(TrainConfig(data_dirs={"CT": "x"}, channels_last="on"))


def test_threads_are_set_once_before_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_cli, "set_threads", lambda threads, processes: calls.append((threads, processes)))
    monkeypatch.setattr(train_cli, "train", lambda *args, **kwargs: None)
    assert train_cli.main(small_args(tmp_path / "r", tmp_path / "cache", 1) + ["--threads", "3"]) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's ranks on this machine share its cores
    assert train_cli.main(small_args(tmp_path / "r", tmp_path / "cache", 1)) == 0
    assert calls == [(3, 1), (0, 2)]


# ---------------------------------------------------------------------------------------------- cross-validation


def volume(sub: str) -> np.ndarray:
    """An 8^3 image (a ramp: a constant scan is refused) or label (all class 1), for ``imagesTr`` or ``labelsTr``."""
    return np.arange(512, dtype=np.int16).reshape(8, 8, 8) if sub == "imagesTr" else np.ones((8, 8, 8), np.uint8)


def tiny_dataset(folder: Path, ids: list[str], validation: list[str] = ()) -> Path:
    """imagesTr/labelsTr of 8^3 volumes named ``ids``, plus a datalist when some are ``validation`` scans."""
    for case in [*ids, *validation]:
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume(sub), np.eye(4)), folder / sub / f"{case}.nii.gz")
    if validation:
        entry = lambda c: {"image": f"imagesTr/{c}.nii.gz", "label": f"labelsTr/{c}.nii.gz"}  # noqa: E731
        (folder / "dataset.json").write_text(json.dumps({"training": [entry(c) for c in ids],
                                                         "validation": [entry(c) for c in validation]}))
    return folder


def selected(config: TrainConfig, log=None) -> Trainer:
    """A trainer prepared up to its case lists (no volumes, model or optimiser), its run folder let go."""
    trainer = Trainer(config, log=log or (lambda m: None))
    trainer.setup_data = trainer.setup_optimisation = lambda: None
    trainer.build_model = lambda table: None
    trainer.prepare()
    trainer.close()
    return trainer


def ids(cases) -> list[str]:
    return [c.id for c in cases]


def test_each_fold_validates_on_its_share_of_every_modality(tmp_path):
    ct = tiny_dataset(tmp_path / "ct", [f"c{i}" for i in range(5)])
    mr = tiny_dataset(tmp_path / "mr", [f"m{i}" for i in range(3)])
    config = TrainConfig(data_dirs={"CT": str(ct), "MR": str(mr)}, text="onehot", out=str(tmp_path / "cv"),
                         num_folds=2, seed=3)
    folds = [selected(dataclasses.replace(config, fold=k)) for k in range(2)]
    expected = mdata.make_folds({"CT": [f"c{i}" for i in range(5)], "MR": [f"m{i}" for i in range(3)]}, 2, 3)
    for k, trainer in enumerate(folds):
        assert trainer.out == tmp_path / "cv" / f"fold_{k}"
        assert trainer.splits == expected
        for name in ("CT", "MR"):
            assert ids(trainer.cases[name]) == expected[name][k]["train"]
            assert ids(trainer.val_cases[name]) == expected[name][k]["val"]
    assert sorted(ids(folds[0].val_cases["CT"]) + ids(folds[1].val_cases["CT"])) == [f"c{i}" for i in range(5)]
    assert sorted(len(f.val_cases["MR"]) for f in folds) == [1, 2]
    # --max_cases subsamples the fold's training scans; the validation scans stay the fold's.
    capped = selected(dataclasses.replace(config, fold=0, max_cases={"CT": 1}))
    assert len(capped.cases["CT"]) == 1 and set(ids(capped.cases["CT"])) <= set(expected["CT"][0]["train"])
    assert ids(capped.val_cases["CT"]) == expected["CT"][0]["val"]
    with pytest.raises(TrainingError, match=re.escape("--num_folds 4: MR: 3 scan(s) cannot be split into 4 folds")):
        selected(dataclasses.replace(config, fold=0, num_folds=4))


def test_a_study_reuses_its_split_and_checks_a_given_one(tmp_path):
    ct = tiny_dataset(tmp_path / "ct", ["a", "b", "c", "d"])
    config = TrainConfig(data_dirs={"CT": str(ct)}, text="onehot", out=str(tmp_path / "cv"), fold=1)
    mine = {"CT": [{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a"]}]}
    given = tmp_path / "mine.json"
    given.write_text(json.dumps(mine))
    trainer = selected(dataclasses.replace(config, splits=str(given)))
    assert ids(trainer.cases["CT"]) == ["c", "d"] and ids(trainer.val_cases["CT"]) == ["a"]  # b unused
    # OUT/splits.json, once an earlier fold wrote it, is the split, whatever --seed and --num_folds' default say.
    (tmp_path / "cv").mkdir(exist_ok=True)
    (tmp_path / "cv" / "splits.json").write_text(json.dumps(mine))
    trainer = selected(dataclasses.replace(config, seed=7))
    assert ids(trainer.val_cases["CT"]) == ["a"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"CT": mine["CT"][::-1]}))
    with pytest.raises(TrainingError,
                       match=re.escape(f"--splits {other} differs from {tmp_path / 'cv' / 'splits.json'}")):
        selected(dataclasses.replace(config, splits=str(other)))
    with pytest.raises(TrainingError, match=re.escape(f"{tmp_path / 'cv' / 'splits.json'} holds 2 folds, but "
                                                      "--num_folds is 3")):
        selected(dataclasses.replace(config, num_folds=3))
    (tmp_path / "cv" / "splits.json").write_text(json.dumps({"CT": [{"train": ["a"], "val": ["b", "zz"]},
                                                                    {"train": ["b"], "val": ["b"]}]}))
    with pytest.raises(TrainingError) as err:
        selected(config)
    assert str(err.value).splitlines()[1:] == [
        f"  - {tmp_path / 'cv' / 'splits.json'}: CT fold 0 names 1 scan(s) not in the data: zz",
        f"  - {tmp_path / 'cv' / 'splits.json'}: CT fold 1 trains and validates on b",
        f"  - {tmp_path / 'cv' / 'splits.json'}: CT b is in the validation lists of folds 0 and 1; the folds must be "
        "disjoint"]


def test_a_datalists_validation_list_is_the_validation_set_unless_a_fold_is_asked_for(tmp_path):
    ct = tiny_dataset(tmp_path / "ct", ["a", "b", "c", "d"], validation=["v"])
    config = TrainConfig(data_dirs={"CT": str(ct)}, text="onehot", out=str(tmp_path / "r"), val_every=1)
    check_config(config)  # the datalist gives --val_every something to validate on
    trainer = selected(config)
    assert ids(trainer.cases["CT"]) == ["a", "b", "c", "d"] and ids(trainer.val_cases["CT"]) == ["v"]
    with pytest.raises(TrainingError, match=re.escape(f"--val_fraction 0.5: {ct}/dataset.json has a validation list "
                                                      "(1 scans), which is the validation set; drop --val_fraction")):
        selected(dataclasses.replace(config, val_fraction=0.5))
    messages = []
    trainer = selected(dataclasses.replace(config, fold=0, num_folds=2), log=messages.append)
    assert "v" not in ids(trainer.cases["CT"]) + ids(trainer.val_cases["CT"]) and len(trainer.val_cases["CT"]) == 2
    assert ("CT: fold 0 leaves 0 scan(s) of the training list and the 1 of the datalist's validation list unused"
            in messages)


def test_two_folds_train_validate_report_and_resume_on_their_split(tmp_path, cache, capsys):
    """The sample CT and MR twice each: fold K trains on one copy and validates on the other."""
    data = {}
    for name in ("ct", "mr"):
        data[name] = tmp_path / name
        for sub in ("imagesTr", "labelsTr"):
            (data[name] / sub).mkdir(parents=True)
            for case in ("a", "b"):
                (data[name] / sub / f"{case}.nii.gz").symlink_to(SAMPLE / name / sub / f"ts_{name}_001.nii.gz")
    study = tmp_path / "cv"
    args = ["--ct_dir", str(data["ct"]), "--mr_dir", str(data["mr"]), *SMALL, "--epochs", "1", "--out", str(study),
            "--cache_dir", str(cache), "--num_folds", "2", "--seed", "1"]
    assert train_cli.main([*args, "--fold", "0"]) == 0
    split = json.loads((study / "splits.json").read_text())
    assert split == mdata.make_folds({"CT": ["a", "b"], "MR": ["a", "b"]}, 2, 1)
    # The second fold reads the study's split, here edited to show that it is read, not made again.
    swapped = {name: folds[::-1] for name, folds in split.items()}
    (study / "splits.json").write_text(json.dumps(swapped))
    assert train_cli.main([*args, "--fold", "1"]) == 0
    for fold, folds in ((0, split), (1, swapped)):
        run = study / f"fold_{fold}"
        assert load_checkpoint(run / "last.pt")["cases"] == {n: folds[n][fold] for n in ("CT", "MR")}
        record = json.loads((run / "log.jsonl").read_text())  # validated after the last epoch without --val_every
        for name in ("CT", "MR"):
            with open(run / "validation" / name / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            assert [r["case"] for r in rows] == folds[name][fold]["val"] and rows[0]["modality"] == name
            assert float(rows[0]["mean"]) == pytest.approx(record[f"{name}/val_dice"], abs=5e-5)
            summary = json.loads((run / "validation" / name / "summary.json").read_text())
            assert summary["settings"]["epoch"] == 1 and summary["settings"]["fold"] == fold
    capsys.readouterr()
    # A resumed fold keeps its split: the one it trained on, not an edited splits.json.
    (study / "splits.json").write_text(json.dumps(split))
    assert train_cli.main([*args, "--fold", "1", "--resume", "--epochs", "2"]) == 2
    assert "--resume: the CT training scans differ from the saved run's" in capsys.readouterr().err
    (study / "splits.json").write_text(json.dumps(swapped))
    assert train_cli.main([*args, "--fold", "1", "--resume", "--epochs", "2"]) == 0
    assert load_checkpoint(study / "fold_1" / "last.pt")["epoch"] == 2
    assert train_cli.main(["--out", str(study), "--resume", "--epochs", "3"]) == 2
    assert (f"--resume: {study / 'last.pt'} does not exist (a cross-validation study: pass its --fold K)"
            in capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- partial labels


def partial_copy(folder: Path, source: Path, cases: dict[str, str], keep: dict[int, str]) -> Path:
    """``source``'s scan as each of ``cases`` (id -> "training" or "validation") with only the classes ``keep``
    (value -> name) labelled, and a dataset.json that says so: a partially labelled dataset such as CHAOS."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    name = next((source / "imagesTr").iterdir()).name
    label = nib.load(source / "labelsTr" / name)
    values = np.asarray(label.dataobj)
    datalist: dict = {"labels": {"0": "background", **{str(k): v for k, v in keep.items()}},
                      "training": [], "validation": []}
    for case, part in cases.items():
        shutil.copy(source / "imagesTr" / name, folder / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(np.where(np.isin(values, list(keep)), values, 0).astype(np.uint8), label.affine),
                 folder / "labelsTr" / f"{case}.nii.gz")
        datalist[part].append({"image": f"imagesTr/{case}.nii.gz", "label": f"labelsTr/{case}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps(datalist))
    return folder


def test_a_partially_labelled_dataset_trains_with_its_mask_validates_and_resumes_only_unchanged(
        tmp_path, cache, capsys):
    part = partial_copy(tmp_path / "chaos", SAMPLE / "mr", {"part_001": "training", "part_002": "validation"},
                        {1: "spleen", 6: "liver"})
    out = tmp_path / "run"
    args = ["--ct_dir", str(SAMPLE / "ct"), "--mr_dir", str(SAMPLE / "mr"), str(part), *SMALL, "--epochs", "1",
            "--out", str(out), "--cache_dir", str(cache), "--val_every", "1"]
    trainer = Trainer(train_cli.config_from_args(train_cli.build_parser().parse_args(args)), log=lambda m: None)
    trainer.prepare()
    assert [c.id for c in trainer.val_cases["MR"]] == ["part_002"] and not trainer.val_cases["CT"]
    # Every crop carries its volume's mask once one dataset is partial (CT's and the full MR's are all True).
    masks = {c.id: m.tolist() for c, m in zip(trainer.cases["MR"], trainer.loaders["MR"].dataset.labelled)}
    assert masks == {"part_001": [k in (0, 1, 6) for k in range(14)], "ts_mr_001": [True] * 14}
    assert all(m.all() for m in trainer.loaders["CT"].dataset.labelled)
    batch = next(trainer.loaders["MR"].batches(0))
    assert batch["labelled"].shape == (2, 14) and batch["labelled"].dtype == torch.bool  # 1 volume x 2 crops
    record = trainer.fit()
    trainer.close()
    assert np.isfinite(record["MR/dice_loss"]) and np.isfinite(record["MR/val_dice"])
    saved = load_checkpoint(out / "last.pt")["config"]["datasets"]
    assert saved == {"CT": [{"dir": str(SAMPLE / "ct"), "labelled": "all"}],
                     "MR": [{"dir": str(SAMPLE / "mr"), "labelled": "all"},
                            {"dir": str(part), "labelled": ["spleen", "liver"]}]}
    assert json.loads((out / "config.json").read_text())["datasets"] == saved
    # Validation scores the validation scan's labelled organs only.
    summary = (out / "validation" / "MR" / "summary.md").read_text()
    assert summary.count("not labelled") == 11 and "absent" not in summary.split("\n\n")[1]
    per_class = record["MR/val_dice_per_class"]
    assert [k + 1 for k, v in enumerate(per_class) if v is not None] == [1, 6]
    # A dataset.json that now labels another set of classes is refused on resume, before any work.
    labels = json.loads((part / "dataset.json").read_text())
    labels["labels"] = {"0": "background", "1": "spleen"}
    (part / "dataset.json").write_text(json.dumps(labels))
    capsys.readouterr()
    assert train_cli.main(args + ["--epochs", "2", "--resume"]) == 2
    assert (f"--resume: the classes a dataset labels changed since the run started ({part} labelled ['spleen', "
            "'liver'], now ['spleen'])") in capsys.readouterr().err


def test_dataset_flags_take_several_folders_per_modality_and_their_labelled_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train_cli.build_parser().parse_args(["--ct_dir", "ct1", "ct2", "--mr_dir", "mr", "--data_dir", "PET=p1",
                                                "--data_dir", "PET=p2", "--labelled", "mr=liver, spleen",
                                                "--labelled", "ct2=spleen"])
    config = train_cli.config_from_args(args)
    assert config.data_dirs == {"CT": [str(tmp_path / "ct1"), str(tmp_path / "ct2")], "MR": [str(tmp_path / "mr")],
                                "PET": [str(tmp_path / "p1"), str(tmp_path / "p2")]}
    assert config.labelled == {str(tmp_path / "mr"): ["liver", "spleen"], str(tmp_path / "ct2"): ["spleen"]}
    with pytest.raises(TrainingError, match="--labelled expects NAME=VALUE, got 'liver'"):
        train_cli.config_from_args(train_cli.build_parser().parse_args(["--labelled", "liver"]))


def test_skipped_steps_are_counted_per_modality_and_too_many_in_a_row_stop_the_run(tmp_path, cache, monkeypatch,
                                                                                   capsys):
    from mulmodseg.alt import GradientGuard
    calls = []
    real = GradientGuard.admits

    def first_corrupt(self, norm):  # the first step's gradient is corrupt, the others healthy
        calls.append(norm)
        return real(self, float("inf") if len(calls) == 1 else norm)

    monkeypatch.setattr(GradientGuard, "admits", first_corrupt)
    assert train_cli.main(small_args(tmp_path / "one", cache, 1)) == 0
    record = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[0])
    assert (record["CT/skipped_steps"], record["MR/skipped_steps"]) == (1, 0)
    assert "CT dice_loss" in capsys.readouterr().err
    monkeypatch.setattr(GradientGuard, "admits", lambda self, norm: real(self, float("nan")))
    assert train_cli.main(small_args(tmp_path / "all", cache, 1) + ["--max_skipped_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert ("training stopped at epoch 1, step 2 (MR): the last 2 steps' gradients were not finite or above 1e+15, "
            "so none was applied. No checkpoint had been written yet.") in err


# ---------------------------------------------------------------------------------------------- --augment


def test_augment_nnunet_crops_on_the_device_and_a_resumed_run_equals_a_straight_one(tmp_path, cache):
    def config(out, epochs):
        args = small_args(tmp_path / out, cache, epochs) + ["--augment", "nnunet", "--mirror_axes", "0", "1", "2",
                                                            "--augment_set", "rotation_p=0.5,noise_p=0.5"]
        return train_cli.config_from_args(train_cli.build_parser().parse_args(args))

    trainer = Trainer(config("straight", 2), log=lambda m: None)
    trainer.prepare()
    assert trainer.augment.rotation_p == 0.5 and trainer.augment.mirror_axes == (0, 1, 2)
    batch = next(trainer.loaders["CT"].batches(0))
    # The loader cuts larger crops with their keys; the trainer turns them into 32^3 training crops.
    assert batch["image"].shape[2:] == trainer.loaders["CT"].dataset.cut_size != (32, 32, 32)
    assert batch["key"].tolist() == [[0, 0, 0, 0, 0, 0, k] for k in range(2)]
    augmented = trainer.augmented_batch(batch)
    assert augmented["image"].shape == augmented["label"].shape == (2, 1, 32, 32, 32)
    # With every transform off, the training crops are exactly --augment none's: the larger crops are centred
    # where the training crops are (they once sat inside the volume: on a scan shorter than them, always its middle).
    plain = Trainer(train_cli.config_from_args(train_cli.build_parser().parse_args(
        small_args(tmp_path / "none", cache, 1) + ["--augment", "none"])), log=lambda m: None)
    plain.prepare()
    expected = next(plain.loaders["CT"].batches(0))
    plain.close()
    settings, trainer.augment = trainer.augment, NnUNetAugment.off()
    unaugmented = trainer.augmented_batch(batch)
    assert torch.equal(unaugmented["image"], expected["image"]) and torch.equal(unaugmented["label"], expected["label"])
    trainer.augment = settings
    trainer.fit()
    trainer.close()
    first = Trainer(config("resumed", 1), log=lambda m: None)
    first.prepare()
    first.fit()
    first.close()
    resumed = Trainer(config("resumed", 2), log=lambda m: None, given={"epochs"})
    resumed.prepare(resume=True)
    resumed.fit()
    resumed.close()
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["config"]["train"]["augment_options"] == {"rotation_p": "0.5", "noise_p": "0.5"}
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("flags, message", [
    (["--augment", "nnunet", "--rotate_degrees", "6"], "--rotate_degrees 6.0 is the paper augmentation's warp; with "
                                                       "--augment nnunet set rotation and scaling with --augment_set"),
    (["--augment_set", "rotation_p=0.5"], "--augment_set applies to --augment nnunet, not paper"),
    (["--augment", "nnunet", "--augment_set", "rotation_p=2"], "--augment_set: augmentation setting rotation_p=2.0: a "
                                                               "probability must be in [0, 1]"),
    (["--augment", "nnunet", "--augment_set", "spin=1"], "--augment_set: unknown augmentation setting(s) spin"),
    (["--augment", "nnunet", "--augment_set", "mirror_axes=0"], "--augment_set mirror_axes: mirroring follows "
                                                                "--mirror_axes"),
    (["--augment_set", "oops"], "--augment_set: augmentation override 'oops': expected name=value"),
])
def test_bad_augmentation_settings_are_one_line_errors_before_any_work(tmp_path, cache, capsys, flags, message):
    assert train_cli.main(small_args(tmp_path / "r", cache, 1) + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "cache").exists()
