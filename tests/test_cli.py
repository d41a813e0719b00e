"""The four commands' exit codes and one-line errors: the documented table (docs/options.md) is the programs'
own, and each command gives each code where the table says, on tiny data (one 24^3 CT, 16^3 crops, a 4-channel UNet)."""

import errno
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mulmodseg import cli
from mulmodseg import outputs as outputs_module
from mulmodseg.checkpoint import load_checkpoint
from mulmodseg.cli import evaluate as evaluate_cli
from mulmodseg.cli import predict as predict_cli
from mulmodseg.cli import text as text_cli
from mulmodseg.cli import train as train_cli
from mulmodseg.files import lock_folder, mount_point

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--text", "onehot", "--base_channels", "4", "--roi_size", "16", "--spacing", "4", "4", "4", "--num_samples",
        "1", "--num_workers", "0", "--warmup_epochs", "0"]


def write_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray | None = None, voxel_mm: float = 4.0):
    affine = np.diag([voxel_mm] * 3 + [1.0])
    for sub, array in (("imagesTr", image), ("labelsTr", label)):
        if array is not None:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), folder / sub / name)
    return folder / "imagesTr" / name


def ct_scan(shape=(24, 24, 24)) -> np.ndarray:
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 4:-4, 4:-4] = np.random.default_rng(0).integers(-100, 200, [n - 8 for n in shape])
    return image


def ct_label(shape=(24, 24, 24)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[8:16, 8:16, 8:16] = 1
    label[10:14, 10:14, 16:20] = 2
    return label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "ct"
    write_case(folder, "c0.nii.gz", ct_scan(), ct_label())
    return folder


def train_args(dataset: Path, out: Path, epochs: int = 1) -> list[str]:
    return ["--ct_dir", str(dataset), *TINY, "--epochs", str(epochs), "--out", str(out)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert train_cli.main(train_args(dataset, out)) == 0
    return out / "last.pt"


def readme_codes() -> dict[int, str]:
    """The documented exit code table (docs/options.md, linked from the README): code -> meaning."""
    text = (ROOT / "docs" / "options.md").read_text()
    section = text[text.index("### Exit codes and errors"):]
    section = section[:section.index("\n### ", 1)]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M)}


def test_the_readme_table_is_the_programs_own():
    codes = readme_codes()
    assert sorted(codes) == [0, cli.EXIT_SYSTEM_ERROR, cli.EXIT_BAD_ARGUMENTS, cli.EXIT_DATA_ERROR,
                             cli.EXIT_INTERRUPTED] == [0, 1, 2, 3, 130]
    assert codes[1].startswith("the system failed") and codes[2].startswith("bad arguments")
    assert codes[3].startswith("a problem in the data or the folders given")
    for parser in (train_cli.build_parser(), predict_cli.build_parser(), evaluate_cli.build_parser(),
                   text_cli.build_parser()):
        assert cli.EXIT_CODES_HELP in parser.epilog
    for code in codes:
        assert f"{code} " in cli.EXIT_CODES_HELP


def test_train_exit_codes_before_any_work(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main([*train_args(dataset, out), "--spacing", "0", "0", "0"]) == 2
    assert "--spacing 0 0 0: give three voxel sizes in mm" in capsys.readouterr().err
    assert not out.exists()  # no empty cache/ left behind
    (tmp_path / "file").write_text("not a folder")
    # A file given as the dataset folder was said not to exist.
    assert train_cli.main(["--ct_dir", str(tmp_path / "file"), *TINY, "--out", str(out)]) == 3
    assert f"{tmp_path / 'file'}: a file, not a dataset folder; give its folder" in capsys.readouterr().err
    # An --out that is a file: 3, as in infer.py and evaluate (it was 2).
    assert train_cli.main(train_args(dataset, tmp_path / "file" / "run")) == 3
    assert f"--out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file" in capsys.readouterr().err


def test_a_second_run_into_one_out_is_refused_with_the_first_ones_pid(dataset, tmp_path, capsys):
    # Two runs into one --out both ran to exit 0, their log lines interleaved and last.pt whichever saved last.
    out = tmp_path / "run"
    held = lock_folder(out, "training run")
    try:
        assert train_cli.main(train_args(dataset, out)) == 2
        assert (f"error: {out} is being written by another training run (PID {os.getpid()}); wait for it to end, or "
                "choose another folder") in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".mulmodseg.lock"]  # nothing else read or written
    finally:
        held.release()
    assert train_cli.main(train_args(dataset, out)) == 0
    assert not (out / ".mulmodseg.lock").exists()


def test_a_full_disk_keeps_last_pt_and_says_how_to_go_on(dataset, tmp_path, capsys, monkeypatch):
    # With --out on a full disk training ended in "RuntimeError: [enforce fail at inline_container.cc:672]".
    out = tmp_path / "run"
    save, calls = torch.save, []

    def fill_at_the_second_save(obj, file):
        calls.append(file)
        if len(calls) == 2:
            file.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, file)

    monkeypatch.setattr(torch, "save", fill_at_the_second_save)
    assert train_cli.main(train_args(dataset, out, epochs=2)) == cli.EXIT_SYSTEM_ERROR
    last = out / "last.pt"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no space left on {mount_point(out)} while writing {last}; {last} is unchanged; free space there; "
        f"{last} (epoch 1) holds the last saved epoch: run the same command with --resume to continue")
    assert load_checkpoint(last)["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith("last.pt") and p.name != "last.pt"]
    monkeypatch.undo()

    # A save killed midway leaves its temporary: the next start removes it (it left 70 MB after five kills).
    dead = out / ".999999.0123abcd.last.pt"
    dead.write_bytes(b"x" * 1000)
    assert train_cli.main([*train_args(dataset, out, epochs=2), "--resume"]) == 0
    assert f"removed 1 temporary file(s) (0.0 MB) that killed writes left in {out}: {dead.name}" in (
        capsys.readouterr().err)
    assert not dead.exists() and load_checkpoint(last)["epoch"] == 2
    assert [line.count('"epoch"') for line in (out / "log.jsonl").read_text().splitlines()] == [1, 1]


def infer_args(checkpoint: Path, scan: Path, output: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--modality", "CT", "-i", str(scan), "-o", str(output)]


def test_infer_exit_codes(checkpoint, dataset, tmp_path, capsys, monkeypatch):
    scan = dataset / "imagesTr" / "c0.nii.gz"
    (tmp_path / "file").write_text("not a folder")
    assert predict_cli.main(infer_args(checkpoint, scan, tmp_path / "file" / "out")) == 3
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err

    held = lock_folder(tmp_path / "busy", "infer.py")
    try:
        assert predict_cli.main(infer_args(checkpoint, scan, tmp_path / "busy")) == 2
        assert f"is being written by another infer.py (PID {os.getpid()})" in capsys.readouterr().err
    finally:
        held.release()

    def full(image, path):
        Path(path).write_bytes(b"half a label map")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs_module.nib, "save", full)
    out = tmp_path / "out"
    assert predict_cli.main(infer_args(checkpoint, scan, out)) == cli.EXIT_SYSTEM_ERROR
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no space left on {mount_point(out)} while writing {out / 'c0.nii.gz'}; {out / 'c0.nii.gz'} is "
        f"unchanged; free space there, then run the same command with --skip_existing: the cases complete in {out} "
        "are kept")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"]
    monkeypatch.undo()
    assert predict_cli.main([*infer_args(checkpoint, scan, out), "--skip_existing"]) == 0
    assert nib.load(out / "c0.nii.gz").shape == (24, 24, 24)


@pytest.mark.parametrize("image, voxel_mm, message", [
    # A header in metres made a 1 x 1 x 1 grid and an empty label map, without a word.
    (ct_scan(), 0.001, "make a grid of 1 x 1 x 1 voxels from 24 x 24 x 24 at the training spacing 4 4 4 mm: the scan "
     "would collapse to a single voxel along an axis"),
    (np.full((24, 24, 24), 300, np.int16), 4.0, "every voxel has the value 300 (or nearly): a blank or constant scan"),
])
def test_infer_refuses_a_scan_its_preprocessing_would_destroy(checkpoint, tmp_path, capsys, image, voxel_mm, message):
    scan = write_case(tmp_path / "in", "s.nii.gz", image, voxel_mm=voxel_mm)
    assert predict_cli.main(infer_args(checkpoint, scan, tmp_path / "out")) == 3
    err = capsys.readouterr().err
    assert f"{scan}: " in err and message in err and not (tmp_path / "out").exists()


def test_infer_names_a_file_that_is_not_nifti(checkpoint, tmp_path, capsys):
    nrrd = tmp_path / "scan.nrrd"
    nrrd.write_bytes(b"NRRD0004")
    assert predict_cli.main(infer_args(checkpoint, nrrd, tmp_path / "out")) == 3  # was a TypeError traceback
    assert f"{nrrd}: not a NIfTI file; only .nii and .nii.gz files are read" in capsys.readouterr().err


def test_evaluate_exit_codes(dataset, tmp_path, capsys):
    labels = dataset / "labelsTr"
    (tmp_path / "file").write_text("not a folder")
    assert evaluate_cli.main(["--pred", str(labels), "--labels", str(labels), "--output", str(tmp_path / "file")]) == 3
    assert evaluate_cli.main(["--pred", str(labels), "--labels", str(labels), "--classes", "nope"]) == 2
    assert "unknown class set 'nope'" in capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the text tower was loaded before the flags were checked")
    monkeypatch.setattr(text_cli, "load_text_encoder", load)


@pytest.mark.parametrize("flags, message", [
    (["--classes", "nope"], "error: --classes nope: unknown class set 'nope'"),  # exited 1 after loading the tower
    (["--template", "A {organ}."], "error: --template A {organ}.: template 'A {organ}.' must be one of"),
    (["--modalities", "CT", "CT"], "error: --modalities CT CT: each modality is one row of the table; name it once"),
    (["--phrase", "T1"], "error: --phrase expects NAME=WORDS, got 'T1'"),
])
def test_text_flags_that_cannot_work_exit_2_before_the_tower_loads(tmp_path, capsys, no_loading, flags, message):
    assert text_cli.main(["--out", str(tmp_path / "t.pt"), *flags]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_text_system_errors_and_ctrl_c(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_cli, "load_text_encoder", interrupted)
    assert text_cli.main(["--out", str(tmp_path / "t.pt")]) == 130
    assert capsys.readouterr().err == f"\ninterrupted; {tmp_path / 't.pt'} was not written\n"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(text_cli, "load_text_encoder", full)
    assert text_cli.main(["--out", str(tmp_path / "t.pt")]) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"


def test_exit_code_of_each_error_class():
    from mulmodseg.config import TrainingError
    from mulmodseg.data import DataError
    from mulmodseg.errors import DiskFullError

    assert [cli.exit_code(e) for e in (DataError("x"), TrainingError("x"), ValueError("x"), DiskFullError("x"),
                                       OSError("x"), KeyboardInterrupt())] == [3, 2, 2, 1, 1, 130]


def test_a_run_that_cannot_start_lets_its_folder_go(dataset, tmp_path):
    # Through the Python API, a Trainer whose prepare() fails (here: the data) must not keep the folder locked for
    # the next attempt in the same process (a notebook keeps the failed one alive in its traceback).
    from mulmodseg.training import Trainer

    bad = write_case(tmp_path / "bad", "c.nii.gz", np.full((24, 24, 24), 5, np.int16), ct_label())
    out = tmp_path / "run"
    out.mkdir()
    failed = Trainer(train_cli.config_from_args(
        train_cli.build_parser().parse_args(train_args(bad.parent.parent, out))))
    with pytest.raises(Exception, match="a blank or constant scan"):
        failed.prepare()
    assert failed.lock is None and train_cli.main(train_args(dataset, out)) == 0
