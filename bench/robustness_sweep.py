"""The robustness sweep: bad inputs and faults against the four commands, on tiny data.

train.py, infer.py, ``python -m mulmodseg.evaluate`` and ``python -m mulmodseg.text`` meet corrupt, truncated,
2D, 4D, NaN, constant, mislabelled and mis-sized files, settings that would destroy the data, headers in the
wrong unit, folders that are files or hold the inputs, a second run into one folder, kill -9, a full disk (a small
tmpfs, where ``unshare -rm`` may mount one) and long, odd or non-NIfTI names. A case fails when it

- ends in a traceback (a bug: every problem with what was given must be one ``error:`` line);
- exits 0 where its data or settings are destroyed, or with another code than the README's table gives it;
- misses the words its message must hold (the file, the problem, what to do);
- changes or removes a file it was given (scans, labels, checkpoints, earlier outputs), beyond what it may.

Most cases call the programs' ``main`` in this process (seconds in all); the ones about processes (locks, kill -9,
a full disk) run them as the user does. Prints one line per case and exits 1 when any fails::

    python bench/robustness_sweep.py             # about 3 minutes on 2 CPU cores
    python bench/robustness_sweep.py --only lock # the cases whose name holds a word
    python bench/robustness_sweep.py --list
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mulmodseg.checkpoint import load_checkpoint  # noqa: E402
from mulmodseg.cli import evaluate as evaluate_cli  # noqa: E402
from mulmodseg.cli import predict as predict_cli  # noqa: E402
from mulmodseg.cli import text as text_cli  # noqa: E402
from mulmodseg.cli import train as train_cli  # noqa: E402

MAINS = {"train": train_cli.main, "infer": predict_cli.main, "evaluate": evaluate_cli.main, "text": text_cli.main}
SCRIPTS = {"train": [str(ROOT / "train.py")], "infer": [str(ROOT / "infer.py")],
           "evaluate": ["-m", "mulmodseg.evaluate"], "text": ["-m", "mulmodseg.text"]}
TINY = ["--text", "onehot", "--base_channels", "4", "--roi_size", "16", "--spacing", "4", "4", "4", "--num_samples",
        "1", "--num_workers", "0", "--warmup_epochs", "0"]
SHAPE = (24, 24, 24)

# ------------------------------------------------------------------------------------------------ tiny data


def nifti(path: Path, array: np.ndarray, voxel_mm: float = 4.0, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` as NIfTI at ``path`` (folders made), with ``voxel_mm`` voxels or ``affine``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([voxel_mm] * 3 + [1.0]) if affine is None else affine), path)
    return path


def ct_image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Air around a body of soft tissue, in HU."""
    image = np.full(shape, -1000, np.int16)
    image[4:-4, 4:-4, 4:-4] = np.random.default_rng(seed).integers(-100, 200, [n - 8 for n in shape])
    return image


def mr_image(seed: int = 0, shape=SHAPE) -> np.ndarray:
    """Dark background around a brighter body, MR-like."""
    image = np.zeros(shape, np.float32)
    image[4:-4, 4:-4, 4:-4] = np.random.default_rng(seed).uniform(100, 600, [n - 8 for n in shape])
    return image


def label(shape=SHAPE) -> np.ndarray:
    """Two organs (classes 1 and 2)."""
    lab = np.zeros(shape, np.uint8)
    lab[8:16, 8:16, 8:16] = 1
    lab[10:14, 10:14, 16:20] = 2
    return lab


def dataset(folder: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray | None] | None = None,
            voxel_mm: float = 4.0) -> Path:
    """An MSD folder (imagesTr, labelsTr) of the named images and their labels (``label()`` unless given)."""
    labels = labels or {}
    for name, image in images.items():
        nifti(folder / "imagesTr" / name, image, voxel_mm)
        lab = labels.get(name, label(image.shape[:3]) if image.ndim >= 3 else None)
        if lab is not None:
            nifti(folder / "labelsTr" / name, lab, voxel_mm)
    return folder


def raw(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def truncated(path: Path, source: Path) -> Path:
    return raw(path, source.read_bytes()[: source.stat().st_size // 2])


def huge_header(path: Path) -> Path:
    """A .nii whose header claims 10000^3 int16 voxels over 64 bytes."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).header
    header.set_data_shape((10000, 10000, 10000))
    header["vox_offset"] = 352
    return raw(path, header.binaryblock + b"\0" * 68)


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Outcome:
    code: int | None  # None: ended in an exception
    output: str
    traceback: str | None = None


@dataclass
class Case:
    """One bad input or fault: ``setup(ws, d)`` makes its files in its folder ``d`` and returns the arguments of
    ``program``; ``code`` is the README's exit code for it, ``says`` the words its output must hold ("{d}": the
    folder ``d``), ``check`` a last look at what it left, ``may_change`` the given files (relative to ``d``) it may
    rewrite or remove."""

    name: str
    program: str
    setup: Callable[[Workspace, Path], list[str]]
    code: int
    says: tuple[str, ...] = ()
    check: Callable[[Workspace, Path], str | None] | None = None
    may_change: tuple[str, ...] = ()


@dataclass
class Scenario:
    """A case about processes: ``run(ws, d)`` returns its failures."""

    name: str
    run: Callable[[Workspace, Path], list[str]]
    program: str = "process"


@dataclass
class Workspace:
    root: Path
    ct: Path = field(init=False)
    mr: Path = field(init=False)
    checkpoint: Path = field(init=False)

    def build(self) -> None:
        """Two CT and one MR scan, and a checkpoint trained on them for one epoch."""
        self.ct = dataset(self.root / "data" / "ct", {"c0.nii.gz": ct_image(0), "c1.nii.gz": ct_image(1)})
        self.mr = dataset(self.root / "data" / "mr", {"m0.nii.gz": mr_image(0)})
        out = self.root / "run"
        result = in_process("train", ["--ct_dir", str(self.ct), "--mr_dir", str(self.mr), *TINY, "--epochs", "1",
                                      "--out", str(out)])
        if result.code != 0:
            raise SystemExit(f"the workspace's checkpoint could not be trained:\n{result.output}{result.traceback}")
        self.checkpoint = out / "last.pt"

    def train(self, d: Path, *flags: str, ct: Path | None = None, mr: Path | None = None,
              out: Path | None = None) -> list[str]:
        """train.py's arguments: the CT folder (the workspace's unless given), an MR folder when given, tiny
        settings, one epoch into ``out`` (``d/run``); ``flags`` after them."""
        folders = ["--ct_dir", str(ct or self.ct)] + (["--mr_dir", str(mr)] if mr else [])
        return [*folders, *TINY, "--epochs", "1", "--out", str(out or d / "run"), *flags]

    def infer(self, d: Path, scans: Path, *flags: str, modality: str = "CT", output: Path | None = None) -> list[str]:
        return ["--checkpoint", str(self.checkpoint), "--modality", modality, "-i", str(scans), "-o",
                str(output or d / "out"), *flags]


def in_process(program: str, argv: list[str]) -> Outcome:
    """``program``'s main on ``argv`` here, its stdout and stderr caught; an exception is a traceback."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return Outcome(MAINS[program](argv), out.getvalue())
        except SystemExit as exit_:  # argparse
            return Outcome(exit_.code if isinstance(exit_.code, int) else 2, out.getvalue())
        except BaseException:  # a bug of the program under test, reported with its traceback
            return Outcome(None, out.getvalue(), traceback.format_exc())


def command(program: str, argv: list[str]) -> list[str]:
    return [sys.executable, *SCRIPTS[program], *argv]


def snapshot(*folders: Path) -> dict[Path, str]:
    """sha256 of every file under ``folders``."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders if folder.exists()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def judge(case: Case, ws: Workspace, d: Path, outcome: Outcome, before: dict[Path, str]) -> list[str]:
    """The failures of ``case`` run in ``d``."""
    failures = []
    if outcome.traceback:
        failures.append("traceback: " + outcome.traceback.strip().splitlines()[-1])
    elif outcome.code != case.code:
        failures.append("exit 0 on destroyed data or settings" if outcome.code == 0 else
                        f"exit {outcome.code}, the README says {case.code}")
    failures += [f"the output lacks {words!r}" for words in case.says if words.replace("{d}", str(d))
                 not in outcome.output]
    after = snapshot(ws.ct, ws.mr, ws.checkpoint.parent, d)
    allowed = {d / p for p in case.may_change}
    failures += [f"{p} was {'changed' if p in after else 'removed'}" for p, digest in before.items()
                 if after.get(p) != digest and p not in allowed]
    if case.check is not None and not failures:
        failures += [problem] if (problem := case.check(ws, d)) else []
    return failures


# ------------------------------------------------------------------------------------------------ checks


def nothing_written(*names: str) -> Callable[[Workspace, Path], str | None]:
    def check(ws: Workspace, d: Path) -> str | None:
        made = [name for name in names if (d / name).exists()]
        return f"{', '.join(made)} written though the command failed before any work" if made else None
    return check


def label_map_on_grid(name: str, shape=SHAPE) -> Callable[[Workspace, Path], str | None]:
    def check(ws: Workspace, d: Path) -> str | None:
        try:
            found = nib.load(d / "out" / name).shape
        except Exception as error:  # nibabel raises many types for a bad file
            return f"out/{name} unreadable ({error})"
        return None if found == shape else f"out/{name} has shape {found}, not {shape}"
    return check


# ------------------------------------------------------------------------------------------------ the cases


def training_cases() -> list[Case]:
    def bad(name: str, image=None, lab=None, labels: dict | None = None) -> Callable[[Workspace, Path], list[str]]:
        """train.py on a CT folder of one bad case (and one good)."""
        def setup(ws: Workspace, d: Path) -> list[str]:
            images = {"good.nii.gz": ct_image(), name: ct_image() if image is None else image}
            folder = dataset(d / "ds", images, {name: lab, **(labels or {})} if lab is not None or labels else None)
            return ws.train(d, ct=folder)
        return setup

    def spoiled(name: str, spoil: Callable[[Path], object], which: str = "imagesTr") -> Callable:
        """train.py on a CT folder whose case ``name``'s image (or label) file ``spoil`` ruins."""
        def setup(ws: Workspace, d: Path) -> list[str]:
            folder = dataset(d / "ds", {"good.nii.gz": ct_image(), name: ct_image(1)})
            spoil(folder / which / name)
            return ws.train(d, ct=folder)
        return setup

    four_d = np.repeat(ct_image()[..., None], 2, axis=3)
    nan = ct_image().astype(np.float32)
    nan[10, 10, 10] = np.nan
    one_voxel_class = label()
    one_voxel_class[20, 20, 20] = 3  # 4 mm voxels at 12 mm: nearest-neighbour resampling misses it
    turned = np.array([[0, -4.0, 0, 0], [4.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]])  # the image's, turned 90 deg
    cases = [Case(f"train: {flags[0]} {' '.join(flags[1:])}", "train",
                  lambda ws, d, flags=flags: ws.train(d, *flags), 2, (f"{' '.join(flags)}:",),
                  nothing_written("run"))
             for flags in (["--spacing", "-6", "6", "6"], ["--spacing", "inf", "6", "6"], ["--spacing", "0", "0", "0"],
                           ["--spacing", "nan", "1", "1"], ["--ct_window", "275", "-125"],
                           ["--ct_window", "100", "100"], ["--mr_percentiles", "99", "1"],
                           ["--mr_percentiles", "0", "150"])]
    cases += [
        Case("train: --epochs 0", "train", lambda ws, d: ws.train(d, "--epochs", "0"), 2, ("--epochs must be > 0",)),
        Case("train: --roi_size 20", "train", lambda ws, d: ws.train(d, "--roi_size", "20"), 2, ("multiples of 8",)),
        Case("train: --classes nope", "train", lambda ws, d: ws.train(d, "--classes", "nope"), 2, ("--classes nope",)),
        Case("train: --mode PET", "train", lambda ws, d: ws.train(d, "--mode", "PET"), 2, ("--mode 'PET'",)),
        Case("train: --ct_dir a file", "train", lambda ws, d: ws.train(d, ct=raw(d / "f", b"x")), 3,
             ("{d}/f: a file, not a dataset folder",)),
        Case("train: --ct_dir missing", "train", lambda ws, d: ws.train(d, ct=d / "none"), 3,
             ("dataset folder does not exist",)),
        Case("train: --ct_dir empty", "train", lambda ws, d: ws.train(d, ct=(d / "e").mkdir() or d / "e"), 3,
             ("no train cases found",)),
        Case("train: --ct_dir of .nrrd files", "train",
             lambda ws, d: ws.train(d, ct=raw(d / "n" / "imagesTr" / "a.nrrd", b"NRRD").parent.parent), 3,
             (".nrrd files, but only .nii and .nii.gz files are read",)),
        Case("train: --out a file", "train", lambda ws, d: [*ws.train(d), "--out", str(raw(d / "f", b"x") / "r")], 3,
             ("{d}/f is a file, not a folder",)),
        Case("train: --cache_dir a file", "train", lambda ws, d: ws.train(d, "--cache_dir", str(raw(d / "f", b"x"))),
             3, ("--cache_dir {d}/f: {d}/f is a file",)),
        Case("train: garbage image", "train", spoiled("bad.nii.gz", lambda p: raw(p, b"not a nifti")), 3,
             ("bad.nii.gz: unreadable or truncated image",)),
        Case("train: truncated image", "train", spoiled("bad.nii.gz", lambda p: truncated(p, p)), 3,
             ("bad.nii.gz: unreadable or truncated image data",)),
        Case("train: empty image file", "train", spoiled("bad.nii.gz", lambda p: raw(p, b"")), 3,
             ("bad.nii.gz: unreadable or truncated image",)),
        Case("train: truncated label", "train", spoiled("bad.nii.gz", lambda p: truncated(p, p), "labelsTr"), 3,
             ("labelsTr/bad.nii.gz: unreadable or truncated label",)),
        Case("train: 2D image", "train", bad("bad.nii.gz", ct_image()[:, :, 0], label()[:, :, 0]), 3, ("is 2D",)),
        Case("train: 4D image", "train", bad("bad.nii.gz", four_d), 3, ("image is 4D",)),
        Case("train: NaN voxel", "train", bad("bad.nii.gz", nan), 3, ("1 NaN/Inf voxels in the image",)),
        Case("train: RGB voxels", "train",
             bad("bad.nii.gz", np.zeros(SHAPE, [("R", "u1"), ("G", "u1"), ("B", "u1")])), 3, ("voxels are of type",)),
        Case("train: 10000^3 header", "train", spoiled("bad.nii.gz", uncompressed_huge_header), 3,
             ("its header claims shape (10000, 10000, 10000) of int16, 2 TB",)),
        Case("train: degenerate affine", "train", spoiled("bad.nii.gz", flattened_affine), 3,
             ("affine is degenerate",)),
        Case("train: label of another shape", "train", bad("bad.nii.gz", lab=label((24, 24, 20))), 3,
             ("label shape (24, 24, 20) differs from image shape (24, 24, 24)",)),
        Case("train: label value 200", "train", bad("bad.nii.gz", lab=label() * 100), 3,
             (">= num_classes=14",)),
        Case("train: float label 1.5", "train", bad("bad.nii.gz", lab=label().astype(np.float32) * 0.75), 3,
             ("label values are not integers",)),
        Case("train: an image as its label", "train", bad("bad.nii.gz", lab=ct_image()), 3,
             ("is it an image rather than a label map?",)),
        Case("train: missing label", "train", spoiled("bad.nii.gz", Path.unlink, "labelsTr"), 3,
             ("labelsTr/bad.nii.gz: missing label file",)),
        Case("train: constant CT", "train", bad("bad.nii.gz", np.full(SHAPE, 40, np.int16)), 3,
             ("bad.nii.gz: every voxel has the value 40",)),
        Case("train: constant MR", "train",
             lambda ws, d: ws.train(d, mr=dataset(d / "mr", {"m.nii.gz": np.full(SHAPE, 250.0, np.float32)})), 3,
             ("m.nii.gz: every voxel has the value 250",)),
        Case("train: a header in metres", "train",
             lambda ws, d: ws.train(d, ct=dataset(d / "ds", {"a.nii.gz": ct_image()}, voxel_mm=0.004)), 3,
             ("the scan would collapse to a single voxel along an axis",)),
        Case("train: a class lost to resampling", "train",
             lambda ws, d: ws.train(d, "--spacing", "12", "12", "12",
                                    ct=dataset(d / "ds", {"a.nii.gz": ct_image()}, {"a.nii.gz": one_voxel_class})), 3,
             ("class(es) [3] have no voxel left on the training grid",)),
        Case("train: a label turned by its affine (warning)", "train",
             spoiled("bad.nii.gz", lambda p: nifti(p, label(), affine=turned), "labelsTr"), 0,
             ("its voxels are flipped/transposed onto the image's axes by its own affine",)),
        Case("train: swapped --ct_dir/--mr_dir (warning)", "train",
             lambda ws, d: ["--ct_dir", str(ws.mr), "--mr_dir", str(ws.ct), *ws.train(d)[2:]], 0,
             ("given as CT, but its lowest value is 0",)),
        Case("train: an earlier run's files in --out", "train",
             lambda ws, d: raw(d / "run" / "log.jsonl", b'{"epoch": 1}\n') and ws.train(d), 2,
             ("holds files of an earlier run (log.jsonl)",)),
        Case("train: --resume without a run", "train", lambda ws, d: ws.train(d, "--resume"), 2,
             ("last.pt does not exist",)),
        Case("train: temporaries of a killed save", "train", killed_save_leftovers, 0,
             ("removed 1 temporary file(s)",), lambda ws, d: None if not list((d / "run").glob(".99999*")) else
             "the dead writer's temporary is still there", ("run/last.pt", "run/config.json", "run/log.jsonl",
                                                            "run/curves.png", "run/.999999.0123abcd.last.pt")),
    ]
    return cases


def uncompressed_huge_header(path: Path) -> None:
    """Replace the scan ``path`` (.nii.gz) by a .nii of a 10000^3 header (the label keeps its name)."""
    path.unlink()
    huge_header(path.with_suffix(""))


def flattened_affine(path: Path) -> None:
    """Rewrite the scan ``path`` with a degenerate affine (a zero voxel size), as its sform: nibabel writes no
    qform for one."""
    image = nib.load(path)
    header = image.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(np.diag([4.0, 4.0, 0.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header), path)


def killed_save_leftovers(ws: Workspace, d: Path) -> list[str]:
    """A finished one-epoch run whose later save was killed midway, to --resume for a second epoch."""
    shutil.copytree(ws.checkpoint.parent, d / "run", ignore=shutil.ignore_patterns("cache"))
    raw(d / "run" / ".999999.0123abcd.last.pt", b"x" * 100_000)  # PIDs stay below 2^22 on Linux
    return ["--ct_dir", str(ws.ct), "--mr_dir", str(ws.mr), *TINY, "--epochs", "2", "--out", str(d / "run"), "--resume"]


def inference_cases() -> list[Case]:
    def scans(images: dict[str, np.ndarray], voxel_mm: float = 4.0) -> Callable[[Path], Path]:
        def make(d: Path) -> Path:
            for name, image in images.items():
                nifti(d / "in" / name, image, voxel_mm)
            return d / "in"
        return make

    def on(make: Callable[[Path], Path], *flags: str, modality: str = "CT") -> Callable[[Workspace, Path], list[str]]:
        return lambda ws, d: ws.infer(d, make(d), *flags, modality=modality)

    good = scans({"s.nii.gz": ct_image()})
    long_name = "s" * 236 + ".nii.gz"
    cases = [
        Case("infer: a scan", "infer", on(good), 0, ("s.nii.gz -> ",), label_map_on_grid("s.nii.gz")),
        Case("infer: --output a file", "infer", lambda ws, d: ws.infer(d, good(d), output=raw(d / "f", b"x")), 3,
             ("is a file, not a folder",)),
        Case("infer: --output a NIfTI name", "infer", lambda ws, d: ws.infer(d, good(d), output=d / "p.nii.gz"), 3,
             ("a file name, but --output is the folder",)),
        Case("infer: --output the input folder", "infer",
             lambda ws, d: ws.infer(d, good(d), output=d / "in"), 3, ("the folder of the scans",),
             nothing_written("in/dataset.json")),
        Case("infer: --output in a dataset's imagesTr", "infer",
             lambda ws, d: ws.infer(d, ws.ct / "imagesTr", output=ws.ct / "imagesTr"), 3,
             ("the folder of the scans",)),
        Case("infer: --output the --labels folder", "infer",
             lambda ws, d: ws.infer(d, ws.ct / "imagesTr" / "c0.nii.gz", "--labels", str(ws.ct / "labelsTr"),
                                    output=ws.ct / "labelsTr"), 3, ("the folder of the labels",)),
        Case("infer: nnU-Net names into their own folder, insisted on", "infer",
             lambda ws, d: ws.infer(d, scans({"case_0000.nii.gz": ct_image()})(d), "--into_input_folder",
                                    output=d / "in"), 0, ("case_0000.nii.gz -> ",)),
        Case("infer: that folder again", "infer", nnunet_folder_again, 3, ("rename one of them",),
             lambda ws, d: None if in_process("infer", nnunet_folder_again(ws, d)).output.count(
                 "case.nii.gz: the output would replace an input scan") == 1 else "a problem is printed twice"),
        Case("infer: a .nrrd input", "infer", lambda ws, d: ws.infer(d, raw(d / "scan.nrrd", b"NRRD0004")), 3,
             ("scan.nrrd: not a NIfTI file; only .nii and .nii.gz files are read",)),
        Case("infer: an input without an extension", "infer", lambda ws, d: ws.infer(d, raw(d / "scan", b"x")), 3,
             ("scan: not a NIfTI file",)),
        Case("infer: a 243-character name", "infer", on(scans({long_name: ct_image()})), 0, (" -> ",),
             label_map_on_grid(long_name)),
        Case("infer: a name too long for --save_probabilities", "infer",
             on(scans({"s" * 240 + ".nii.gz": ct_image()}), "--save_probabilities"), 3,
             ("shorten the name of",), nothing_written("out")),
        Case("infer: --labels folder missing", "infer", on(good, "--labels", "/nonexistent/labels"), 3,
             ("--labels /nonexistent/labels: no such folder",)),
        Case("infer: a header in metres", "infer", on(scans({"s.nii.gz": ct_image()}, 0.004)), 3,
             ("the scan would collapse to a single voxel",), nothing_written("out")),
        Case("infer: a constant CT", "infer", on(scans({"s.nii.gz": np.full(SHAPE, 40, np.int16)})), 3,
             ("every voxel has the value 40",)),
        Case("infer: a constant MR", "infer", on(scans({"m.nii.gz": np.full(SHAPE, 9.0, np.float32)}), modality="MR"),
             3, ("every voxel has the value 9",)),
        Case("infer: a CT below the window", "infer",
             on(scans({"s.nii.gz": ct_image() - 3000})), 3, ("lie outside the intensity window -125 275",)),
        Case("infer: an MR of zeros but a few voxels", "infer",
             on(scans({"m.nii.gz": np.pad(np.ones((2, 2, 2), np.float32), 11)}), modality="MR"), 3,
             ("percentiles are both 0",)),
        Case("infer: garbage, truncated, 2D, 4D, NaN scans", "infer", broken_scans, 3,
             ("5 data problem(s)", "g.nii.gz: unreadable", "t.nii.gz: unreadable or truncated", "is 2D", "is 4D",
              "NaN/Inf voxels"), nothing_written("out")),
        Case("infer: a 10000^3 header", "infer", lambda ws, d: ws.infer(d, huge_header(d / "h.nii")), 3,
             ("its header claims shape (10000, 10000, 10000)",)),
        Case("infer: outputs exist", "infer", existing_outputs, 3, ("exists; pass --overwrite",)),
        Case("infer: an output named as its input, --overwrite", "infer", output_is_input, 3,
             ("the output would replace an input scan",)),
        Case("infer: --skip_existing over a zero-byte output, --labels", "infer", zero_byte_output, 0,
             ("earlier output", "segmented again"), label_map_on_grid("c0.nii.gz"), ("out/c0.nii.gz",)),
        Case("infer: --skip_existing over another grid's output", "infer", other_grid_output, 0,
             ("differs from scan shape", "segmented again"), label_map_on_grid("c0.nii.gz"), ("out/c0.nii.gz",)),
        Case("infer: --modality PET", "infer", on(good, modality="PET"), 2, ("trained on ['CT', 'MR']",)),
        Case("infer: --overlap 1", "infer", on(good, "--overlap", "1"), 2, ("--overlap 1",)),
        Case("infer: a missing checkpoint", "infer",
             lambda ws, d: ["--checkpoint", str(d / "none.pt"), *ws.infer(d, good(d))[2:]], 2,
             ("none.pt: no such checkpoint file",)),
        Case("infer: a truncated checkpoint", "infer",
             lambda ws, d: ["--checkpoint", str(truncated(d / "c.pt", ws.checkpoint)), *ws.infer(d, good(d))[2:]], 2,
             ("c.pt: not a readable checkpoint",)),
        Case("infer: --keep_largest nope", "infer", on(good, "--keep_largest", "nope"), 2, ("nope",)),
    ]
    return cases


def nnunet_folder_again(ws: Workspace, d: Path) -> list[str]:
    """The folder that ``infer.py -o`` its own nnU-Net input folder left: case_0000.nii.gz beside case.nii.gz."""
    for name in ("case_0000.nii.gz", "case.nii.gz"):
        if not (d / "in" / name).exists():
            nifti(d / "in" / name, ct_image() if name.endswith("_0000.nii.gz") else label())
    return ws.infer(d, d / "in", "--into_input_folder", "--overwrite", output=d / "in")


def broken_scans(ws: Workspace, d: Path) -> list[str]:
    good = nifti(d / "src.nii.gz", ct_image())
    raw(d / "in" / "g.nii.gz", b"not a nifti")
    truncated(d / "in" / "t.nii.gz", good)
    nifti(d / "in" / "flat.nii.gz", ct_image()[:, :, :1])
    nifti(d / "in" / "four.nii.gz", np.repeat(ct_image()[..., None], 2, axis=3))
    nan = ct_image().astype(np.float32)
    nan[3, 3, 3] = np.inf
    nifti(d / "in" / "nan.nii.gz", nan)
    return ws.infer(d, d / "in")


def existing_outputs(ws: Workspace, d: Path) -> list[str]:
    nifti(d / "out" / "c0.nii.gz", label())
    return ws.infer(d, ws.ct / "imagesTr" / "c0.nii.gz")


def output_is_input(ws: Workspace, d: Path) -> list[str]:
    scan = nifti(d / "in" / "s.nii.gz", ct_image())
    return ws.infer(d, scan, "--overwrite", "--into_input_folder", output=d / "in")


def zero_byte_output(ws: Workspace, d: Path) -> list[str]:
    raw(d / "out" / "c0.nii.gz", b"")
    return ws.infer(d, ws.ct / "imagesTr" / "c0.nii.gz", "--skip_existing", "--labels", str(ws.ct / "labelsTr"))


def other_grid_output(ws: Workspace, d: Path) -> list[str]:
    nifti(d / "out" / "c0.nii.gz", label((20, 24, 24)))
    return ws.infer(d, ws.ct / "imagesTr" / "c0.nii.gz", "--skip_existing")


def evaluation_cases() -> list[Case]:
    def pred(d: Path, array: np.ndarray | None = None, data: bytes | None = None) -> Path:
        path = d / "pred" / "c0.nii.gz"
        if data is not None:
            raw(path, data)
        else:
            nifti(path, label() if array is None else array)
        return d / "pred"

    def args(ws: Workspace, d: Path, predictions: Path, *flags: str) -> list[str]:
        return ["--pred", str(predictions), "--labels", str(ws.ct / "labelsTr"), *flags]

    return [
        Case("evaluate: a prediction", "evaluate", lambda ws, d: args(ws, d, pred(d)), 0, ("scored against",)),
        Case("evaluate: --output a file", "evaluate",
             lambda ws, d: args(ws, d, pred(d), "--output", str(raw(d / "f", b"x"))), 3, ("is a file",)),
        Case("evaluate: --labels missing", "evaluate",
             lambda ws, d: ["--pred", str(pred(d)), "--labels", str(d / "none")], 3, ("no such folder",)),
        Case("evaluate: --classes nope", "evaluate", lambda ws, d: args(ws, d, pred(d), "--classes", "nope"), 2,
             ("unknown class set 'nope'",)),
        Case("evaluate: a prediction of another grid", "evaluate",
             lambda ws, d: args(ws, d, pred(d, label((24, 24, 20)))), 3, ("prediction shape (24, 24, 20) differs",)),
        Case("evaluate: a truncated prediction", "evaluate",
             lambda ws, d: args(ws, d, pred(d, data=(ws.ct / "labelsTr" / "c0.nii.gz").read_bytes()[:100])), 3,
             ("unreadable or truncated prediction",)),
        Case("evaluate: a prediction of value 200", "evaluate", lambda ws, d: args(ws, d, pred(d, label() * 100)), 3,
             (">= num_classes=14",)),
        Case("evaluate: --nsd_tolerance -1", "evaluate", lambda ws, d: args(ws, d, pred(d), "--nsd_tolerance", "-1"),
             2, ("NSD tolerance -1.0: must be a distance in mm",)),
    ]


def text_cases() -> list[Case]:
    def args(d: Path, *flags: str) -> list[str]:
        return ["--clip_weights", str(d / "none.pt"), "--out", str(d / "t.pt"), *flags]

    return [
        Case("text: --classes nope", "text", lambda ws, d: args(d, "--classes", "nope"), 2,
             ("--classes nope: unknown class set",)),
        Case("text: --template without {cls}", "text", lambda ws, d: args(d, "--template", "A {organ}."), 2,
             ("--template A {organ}.",)),
        Case("text: --modalities CT CT", "text", lambda ws, d: args(d, "--modalities", "CT", "CT"), 2,
             ("name it once",)),
        Case("text: --phrase T1", "text", lambda ws, d: args(d, "--phrase", "T1"), 2, ("--phrase expects NAME=WORDS",)),
        Case("text: missing weights", "text", lambda ws, d: args(d), 2, ("none.pt",)),
        Case("text: truncated weights", "text",
             lambda ws, d: ["--clip_weights", str(truncated(d / "w.pt", ws.checkpoint)), *args(d)[2:]], 2, ("w.pt",)),
        Case("text: --out a folder", "text", lambda ws, d: ["--out", str(d)], 2, ("is a folder",)),
        Case("text: --out exists", "text", lambda ws, d: ["--out", str(raw(d / "t.pt", b"mine"))], 2,
             ("exists; pass --overwrite",)),
        Case("text: --device bogus", "text", lambda ws, d: args(d, "--device", "bogus"), 2, ("not a device name",)),
    ]


# ------------------------------------------------------------------------------------------------ processes


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, seconds: float = 240) -> bool:
    """Poll ``condition`` until it holds (True), ``proc`` ends or time runs out (False)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def concurrent_training(ws: Workspace, d: Path) -> list[str]:
    """A run in progress: a second run and a --resume into its --out are refused with its PID; after kill -9 its
    lock blocks nothing and --resume continues it, logging each epoch once."""
    args = ws.train(d, "--epochs", "200")
    first = subprocess.Popen(command("train", args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failures = []
    try:
        if not wait_for(lambda: (d / "run" / "last.pt").is_file(), first):
            return ["the first run wrote no last.pt"]
        # One epoch more than the first run has saved: where nothing refuses them, these end soon.
        again = [*args[:-2], "--epochs", str(load_checkpoint(d / "run" / "last.pt")["epoch"] + 1)]
        for name, extra in (("a second run", []), ("--resume", ["--resume"])):
            outcome = in_process("train", [*again, *extra])
            if outcome.code != 2 or f"(PID {first.pid})" not in outcome.output:
                failures.append(f"{name} while one runs: exit {outcome.code}: {outcome.output.strip()[-200:]}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    done = load_checkpoint(d / "run" / "last.pt")["epoch"]
    outcome = in_process("train", [*args[:-2], "--epochs", str(done + 1), "--resume"])
    if outcome.code != 0:
        failures.append(f"--resume after kill -9: exit {outcome.code}: {outcome.output.strip()[-300:]}")
    epochs = [line.split(",")[0] for line in (d / "run" / "log.jsonl").read_text().splitlines()]
    if len(epochs) != len(set(epochs)) or len(epochs) != done + 1:
        failures.append(f"log.jsonl holds {len(epochs)} records for {done + 1} epochs")
    return failures


def concurrent_inference(ws: Workspace, d: Path) -> list[str]:
    """An infer.py call in progress: a second one into its --output is refused with its PID."""
    for i in range(40):
        nifti(d / "in" / f"s{i:02d}.nii.gz", ct_image(i))
    args = ws.infer(d, d / "in")
    first = subprocess.Popen(command("infer", args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for(lambda: (d / "out" / "s00.nii.gz").is_file(), first):
            return ["the first call segmented nothing"]
        outcome = in_process("infer", [*args, "--skip_existing"])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    if outcome.code != 2 or f"(PID {first.pid})" not in outcome.output:
        return [f"a second call while one runs: exit {outcome.code}: {outcome.output.strip()[-200:]}"]
    outcome = in_process("infer", [*args, "--skip_existing"])  # its lock died with it
    return [] if outcome.code == 0 else [f"--skip_existing after kill -9: exit {outcome.code}"]


def tmpfs_available() -> bool:
    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True).returncode == 0


def on_tmpfs(d: Path, size: int, program: str, argv: list[str], after: str = "") -> Outcome:
    """``program`` with ``argv`` where ``d/mnt`` is a fresh tmpfs of ``size`` bytes, then the Python ``after``,
    which sees the tmpfs (gone once the mount namespace ends) and prints what it finds; "exit=N" is the code."""
    (d / "mnt").mkdir()
    (d / "after.py").write_text(after)
    line = (f"mount -t tmpfs -o size={size} tmpfs {d / 'mnt'} && {shlex.join(command(program, argv))}; "
            f"echo exit=$?; {shlex.quote(sys.executable)} {d / 'after.py'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    return Outcome(proc.returncode, output, output if "Traceback (most recent call last)" in output else None)


def expect(outcome: Outcome, *words: str) -> list[str]:
    """The failures of a process ``outcome`` that must hold ``words`` and no traceback."""
    return [f"the output lacks {w!r}" for w in words if w not in outcome.output] + (
        [f"traceback: {outcome.traceback.strip().splitlines()[-1]}"] if outcome.traceback else [])


def full_disk_training(ws: Workspace, d: Path) -> list[str]:
    """--out on a tmpfs with room for one checkpoint and a half: the second save fails, last.pt of epoch 1 is
    intact, and no temporary is left."""
    size = (ws.checkpoint.stat().st_size * 3 // 2 // 4096 + 1) * 4096
    run = d / "mnt" / "run"
    after = (f"import os, torch\nprint('files', sorted(os.listdir({str(run)!r})))\n"
             f"print('epoch', torch.load({str(run / 'last.pt')!r}, weights_only=False)['epoch'])\n")
    outcome = on_tmpfs(d, size, "train", ws.train(d, "--epochs", "3", "--cache_dir", str(d / "cache"), out=run), after)
    return expect(outcome, f"error: no space left on {d / 'mnt'} while writing {run / 'last.pt'}", "exit=1",
                  "(epoch 1) holds the last saved epoch: run the same command with --resume", "epoch 1",
                  "files ['config.json', 'last.pt', 'log.jsonl']")


def full_disk_inference(ws: Workspace, d: Path) -> list[str]:
    """--output on an 8 KB tmpfs: dataset.json fits, the probabilities do not, and no temporary is left."""
    out = d / "mnt" / "out"
    outcome = on_tmpfs(d, 8192, "infer", ws.infer(d, ws.ct / "imagesTr" / "c0.nii.gz", "--save_probabilities",
                                                  output=out), f"import os\nprint(sorted(os.listdir({str(out)!r})))")
    return expect(outcome, f"error: no space left on {d / 'mnt'} while writing {out / 'c0_probabilities.npz'}",
                  "exit=1", "run the same command with --skip_existing", "['dataset.json']")


def full_disk_cache(ws: Workspace, d: Path) -> list[str]:
    """--cache_dir on a 4 KB tmpfs: the first volume does not fit."""
    outcome = on_tmpfs(d, 4096, "train", ws.train(d, "--cache_dir", str(d / "mnt" / "cache")))
    return expect(outcome, f"error: no space left on {d / 'mnt'} while writing {d / 'mnt' / 'cache'}", "image.npy",
                  "exit=1", "no checkpoint was written yet")


def scenarios() -> list[Scenario]:
    found = [Scenario("process: two trainings into one --out, --resume while one runs, kill -9", concurrent_training),
             Scenario("process: two infer.py calls into one --output, kill -9", concurrent_inference)]
    if tmpfs_available():
        found += [Scenario("process: train.py --out on a full disk", full_disk_training),
                  Scenario("process: infer.py --output on a full disk", full_disk_inference),
                  Scenario("process: train.py --cache_dir on a full disk", full_disk_cache)]
    return found


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="run only the cases whose name holds this text")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = p.parse_args(argv)
    cases = [*training_cases(), *inference_cases(), *evaluation_cases(), *text_cases(), *scenarios()]
    cases = [c for c in cases if not args.only or args.only in c.name]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    work = Path(tempfile.mkdtemp(prefix="robustness_"))
    started = time.monotonic()
    ws = Workspace(work)
    ws.build()
    failed = 0
    for i, case in enumerate(cases):
        d = work / "cases" / f"{i:03d}"
        d.mkdir(parents=True)
        t0 = time.monotonic()
        if isinstance(case, Scenario):
            before = snapshot(ws.ct, ws.mr, ws.checkpoint.parent)
            failures = case.run(ws, d)
            after = snapshot(ws.ct, ws.mr, ws.checkpoint.parent)
            failures += [f"{p} was changed or removed" for p, digest in before.items() if after.get(p) != digest]
        else:
            argv_ = case.setup(ws, d)
            before = snapshot(ws.ct, ws.mr, ws.checkpoint.parent, d)
            failures = judge(case, ws, d, in_process(case.program, argv_), before)
        failed += bool(failures)
        print(f"{'FAIL' if failures else 'ok  '} {time.monotonic() - t0:5.1f}s  {case.name}"
              + "".join(f"\n      - {f}" for f in failures), flush=True)
    print(f"\n{len(cases) - failed} of {len(cases)} cases handled well, {failed} not "
          f"({time.monotonic() - started:.0f}s; work folder {work}{'' if args.keep else ', removed'})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
