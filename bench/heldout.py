"""Held-out accuracy on real scans: how well does a model trained with mulmodseg segment patients it never saw?

Data (``--data``, default ``../shared/data``; never copied into the project, CHAOS's license forbids it):
``chaos-mr-t2`` (10 MR patients, manual spleen, kidneys and liver only), ``ts-ct-slab`` (another patient's CT,
model labels), ``msd-spleen-ct`` (a CT crop with a manual spleen) and ``sample`` (the bundled CT + MR pair).

Cross-validation over CHAOS: 2 folds of 5 + 5 patients (``OUT/splits.json``, written once and reused). Each fold
trains **one** model on the bundled CT + MR and the fold's 5 training CHAOS patients (a partially labelled
dataset: its dataset.json names the four organs it labels), then segments, with infer.py's own code path
(``mulmodseg.predict.segment_files``, default inference settings), the fold's 5 held-out CHAOS patients (MR) and
``ts-ct-slab`` and ``msd-spleen-ct`` (CT), scoring each organ its labels label, and, not held out, the fold's 5
training CHAOS patients (``CHAOS MR fit``: a model that scores low there fails to fit, not to transfer). The
variants, same budget:

- ``a``: the recipe: ALT, CHAOS partially labelled (marginal loss), the paper's augmentation;
- ``b``: MR only (the paper's MR->MR row), the same MR scans, as many optimizer steps as ``a``;
- ``c``: ALT with CHAOS's unlabelled organs read as background (``--labelled`` all classes: the library before
  partial labels);
- ``n``: the recipe with nnU-Net's augmentation (``--augment nnunet --mirror_axes 0 1 2``) instead of the paper's.
  Its runs before 2026-12-08 trained on crops stuck at each scan's middle (a loader bug, bench/RESULTS.md);
- ``m``: ``n`` without mirroring (``--augment nnunet``, no ``--mirror_axes``): nnU-Net's other transforms alone.
  Against ``a`` at 400 steps on both folds: less on the held-out MR, more on every held-out CT organ;
- ``f``: the recipe with a limited field of view on 30 % of the crops (``--fov_prob 0.3 --fov_min 0.15``): the
  held-out CTs are a 40 mm slab and a 130 mm crop (``bench/ct_limits.py``);
- ``r``: the recipe with 30 % of the crops' intensities through a random curve (``--remap_prob 0.3``): a held-out
  patient's T2-dark liver and spleen (``bench/mr_limits.py``), the CT's contrast phase.

``--all`` trains the recipe on everything (bundled pair, all 10 CHAOS patients, ``ts-ct-slab`` and
``msd-spleen-ct`` as partially labelled CT) into ``OUT/all/last.pt``: the model a user would train from this data.

Each run's folder (``OUT/<variant>_fold<K>``) keeps its checkpoint and predictions; a finished run is scored
again, not retrained. The table (Dice and NSD per organ, mean +- std over the held-out cases, training time,
the machine) is printed and appended to ``bench/RESULTS.md``.

    python bench/heldout.py                                    # a on both folds, b, c and n on fold 0
    python bench/heldout.py --runs a_fold0 a_fold1             # the recipe alone
    python bench/heldout.py --all --out runs/heldout           # the model of all the data
    python bench/heldout.py --runs a_fold0 a_fold1 --overlap 0.25  # the trained recipe scored with fewer windows
    python bench/heldout.py --runs a_fold0 a_fold1 --keep_largest  # each organ its largest component
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from mulmodseg import data as mdata  # noqa: E402
from mulmodseg.config import TrainConfig  # noqa: E402
from mulmodseg.outputs import OutputOptions, find_inputs  # noqa: E402
from mulmodseg.predict import InferenceSettings, segment_files  # noqa: E402
from mulmodseg.text.prompts import resolve_classes  # noqa: E402
from mulmodseg.training import train  # noqa: E402

CLASSES = resolve_classes("amos")
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# (held-out set, modality, folder under --data or None for the fold's CHAOS patients, organs in the table)
HELD_OUT = [
    ("CHAOS MR", "MR", None, ("liver", "spleen", "right kidney", "left kidney")),
    ("ts-ct-slab", "CT", "ts-ct-slab", ("liver", "spleen", "stomach", "aorta", "inferior vena cava", "pancreas")),
    ("msd-spleen-ct", "CT", "msd-spleen-ct", ("spleen",)),
]
# Not held out: the fold's own training CHAOS patients through the same path, the check that a model fits what it
# trained on (it showed --augment nnunet's crops missing what inference sees: issue 27, bench/RESULTS.md).
FIT = ("CHAOS MR fit", "MR", None, ("liver", "spleen", "right kidney", "left kidney"))
SETS = (*HELD_OUT, FIT)  # the table's rows
# The recipe's settings (chosen by the runs written in bench/RESULTS.md, "Held-out accuracy"); the variants n, m and
# f train with their AUGMENT settings changed.
RECIPE = dict(backbone="unet", base_channels=8, text="onehot", spacing=(4.5, 4.5, 4.5), roi_size=(48, 48, 48),
              num_samples=4, lr=3e-3, warmup_epochs=2, num_workers=0, positive_centres="class", amp="auto",
              augment="paper", mirror_axes=())
AUGMENT = {"n": dict(augment="nnunet", mirror_axes=(0, 1, 2)), "m": dict(augment="nnunet", mirror_axes=()),
           "f": dict(fov_prob=0.3, fov_min=0.15), "r": dict(remap_prob=0.3)}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding chaos-mr-t2, ts-ct-slab, msd-spleen-ct "
                   "and sample")
    p.add_argument("--out", default="runs/heldout", help="runs, staging folders and splits.json go here")
    p.add_argument("--runs", nargs="*", default=["a_fold0", "a_fold1", "b_fold0", "c_fold0", "n_fold0"],
                   help="VARIANT_foldK of each run (a: the recipe; b: MR only; c: ALT with unlabelled organs read as "
                   "background; n: the recipe with --augment nnunet --mirror_axes 0 1 2; m: n without mirroring; "
                   "f: the recipe with --fov_prob 0.3 --fov_min 0.15; r: the recipe with --remap_prob 0.3; "
                   "folds 0 and 1); a trained "
                   "run is only scored")
    p.add_argument("--all", action="store_true", help="instead: train the recipe on all the data into OUT/all")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of each training (the same for every "
                   "variant): about 20 min on 2 CPU cores")
    p.add_argument("--overlap", type=float, default=InferenceSettings.overlap,
                   help="the sliding window's overlap when segmenting the held-out scans (infer.py's --overlap); "
                   "another than the default writes its predictions to heldout_overlap<X> in the run's folder")
    p.add_argument("--keep_largest", action="store_true", help="every class keeps only its largest connected "
                   "component (infer.py's --keep_largest with no names: each organ scored here is one connected "
                   "structure); the predictions go to a folder ending in _largest in the run's folder")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one fold and variant: a smoke test, not a "
                   "measurement; writes nothing to RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags of ``argv``, checked (each run VARIANT_foldK; ``--quick`` runs the first one, writing nothing)."""
    p = build_parser()
    args = p.parse_args(argv)
    bad = [r for r in args.runs if not re.fullmatch(r"[abcnmfr]_fold[01]", r)]
    if bad:
        p.error(f"--runs {' '.join(bad)}: each run is a, b, c, n, m, f or r, then _fold0 or _fold1")
    if args.quick:
        args.no_write, args.runs = True, args.runs[:1]
    return args


def chaos_split(chaos: Path, out: Path, seed: int) -> list[dict[str, list[str]]]:
    """The 2 folds over the CHAOS patients: ``out/splits.json`` when an earlier run wrote it, else
    ``mdata.make_folds`` with ``seed`` (written there)."""
    path = out / "splits.json"
    if path.is_file():
        return json.loads(path.read_text())["MR"]
    ids = [c.id for c in mdata.discover_cases(chaos, "MR")]
    splits = mdata.make_folds({"MR": ids}, 2, seed)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits, indent=1) + "\n")
    return splits["MR"]


def staged(source: Path, ids: list[str], folder: Path) -> Path:
    """``folder`` as a dataset of ``source``'s cases ``ids``: links to its image and label files and its
    dataset.json's ``labels`` (so the classes it labels go with it); nothing is copied."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for case in ids:
            link = folder / sub / f"{case}.nii.gz"
            if not link.is_symlink():
                link.symlink_to((source / sub / f"{case}.nii.gz").resolve())
    labels = json.loads((source / "dataset.json").read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}, indent=1) + "\n")
    return folder


def run_config(variant: str, data_dirs: dict[str, list[str]], out: Path, steps: int, args: argparse.Namespace
               ) -> TrainConfig:
    """The ``TrainConfig`` of one training: the recipe, ALT or MR only, epochs for ``steps`` optimizer steps."""
    mr_scans = sum(len(mdata.discover_cases(d, "MR")) for d in data_dirs["MR"])
    mode = "MR" if variant == "b" else "alt"
    # An ALT epoch is max(len) iterations of one step per modality; MR only, one step per MR scan.
    per_epoch = mr_scans if mode == "MR" else 2 * max(mr_scans, *(len(mdata.discover_cases(d, "CT"))
                                                                   for d in data_dirs["CT"]))
    epochs = max(1, round(steps / per_epoch))
    labelled = {}
    if variant == "c":  # every class labelled: CHAOS's 0s read as background
        labelled = {d: list(CLASSES[1:]) for dirs in data_dirs.values() for d in dirs if "chaos" in Path(d).name}
    settings = dict(RECIPE, warmup_epochs=min(RECIPE["warmup_epochs"], epochs), **AUGMENT.get(variant, {}))
    if args.quick:
        settings.update(base_channels=4, spacing=(9.0, 9.0, 9.0), roi_size=(32, 32, 32), num_samples=1)
    return TrainConfig(data_dirs=data_dirs, labelled=labelled, out=str(out), mode=mode, epochs=epochs,
                       seed=args.seed, **settings)


def trained(config: TrainConfig) -> float:
    """Train ``config`` unless ``out/last.pt`` holds its last epoch; returns the training seconds (from the
    run's log when it was trained before)."""
    out = Path(config.out)
    log = out / "log.jsonl"
    if (out / "last.pt").is_file() and log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if records and records[-1]["epoch"] == config.epochs:
            return records[-1]["time"]
    t0 = time.time()
    train(config, resume=(out / "last.pt").is_file())
    return time.time() - t0


def inference(args: argparse.Namespace) -> tuple[str, InferenceSettings, OutputOptions]:
    """How the held-out scans are segmented, from the flags: the predictions' folder name in a run's folder
    (``heldout``, ``heldout_overlap<X>`` for another overlap, ``_largest`` appended with ``--keep_largest``),
    infer.py's sliding-window settings and its postprocessing."""
    folder = "heldout" if args.overlap == InferenceSettings.overlap else f"heldout_overlap{args.overlap:g}"
    if args.keep_largest:
        folder += "_largest"
    return (folder, InferenceSettings(overlap=args.overlap),
            OutputOptions(keep_largest=[] if args.keep_largest else None))


def held_out_scores(checkpoint: Path, held_out: dict[str, tuple[str, Path]], out: Path,
                    settings: InferenceSettings, outputs: OutputOptions) -> dict[str, list[dict]]:
    """{set name: infer.py's records} of each held-out set (modality, dataset folder), segmented into
    ``out/<set>`` with ``settings``, postprocessed as ``outputs`` asks and scored against its labels."""
    scores = {}
    for name, (modality, folder) in held_out.items():
        inputs = find_inputs(folder / "imagesTr")
        scores[name] = segment_files(checkpoint, inputs, out / name.replace(" ", "_"), modality, settings, outputs,
                                     overwrite=True, labels_dir=folder / "labelsTr", log=lambda m: None)
    return scores


def organ_cells(records: list[dict], organs: tuple[str, ...], metric: str) -> list[str]:
    """``mean ± std`` over the cases of each organ (cases that do not label it, or where it is absent from
    both maps, left out), then the mean of those means."""
    cells, means = [], []
    for organ in organs:
        values = [r[metric][CLASSES.index(organ) - 1] for r in records]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            cells.append("-")
            continue
        means.append(float(np.mean(values)))
        cells.append(f"{means[-1]:.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{means[-1]:.3f}")
    cells.append(f"{np.mean(means):.3f}" if means else "-")
    return cells


def table(rows: dict[str, dict], metric: str) -> str:
    """One Markdown table: a row per held-out organ (and each set's mean), a column per run."""
    runs = list(rows)
    lines = ["| held-out scans | organ | " + " | ".join(runs) + " |", "|---|---|" + "---:|" * len(runs)]
    lines.append("| | training minutes | " + " | ".join(f"{rows[r]['seconds'] / 60:.1f}" for r in runs) + " |")
    lines.append("| | inference s per scan | " + " | ".join(f"{inference_seconds(rows[r]['scores']):.2f}" for r in runs)
                 + " |")
    for name, _, _, organs in SETS:
        columns = [organ_cells(rows[r]["scores"].get(name, []), organs, metric) for r in runs]
        for i, organ in enumerate([*organs, "mean"]):
            lines.append(f"| {name} | {organ} | " + " | ".join(c[i] for c in columns) + " |")
    return "\n".join(lines) + "\n"


def inference_seconds(scores: dict[str, list[dict]]) -> float:
    """Mean seconds per held-out scan of infer.py's path (read, preprocess, sliding window, restore, write)."""
    return float(np.mean([r["seconds"] for records in scores.values() for r in records]))


def pooled(rows: dict[str, dict], variant: str) -> dict | None:
    """The variant's folds as one row: records of every fold's held-out cases, summed training time."""
    folds = [row for run, row in rows.items() if run.startswith(f"{variant}_fold")]
    if len(folds) < 2:
        return None
    scores = {name: [r for row in folds for r in row["scores"].get(name, [])] for name, _, _, _ in SETS}
    # The CT sets are the same scans for every fold: their mean is over the folds' models.
    return {"scores": scores, "seconds": sum(row["seconds"] for row in folds)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    chaos, sample = data / "chaos-mr-t2", data / "sample"
    missing = [p for p in (chaos, data / "ts-ct-slab", data / "msd-spleen-ct", sample) if not p.is_dir()]
    if missing:
        print(f"error: --data {data}: no {', '.join(p.name for p in missing)} (see the README: how to get CHAOS)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 4 if args.quick else args.steps
    if args.all:
        dirs = {"CT": [str(sample / "ct"), str(data / "ts-ct-slab"), str(data / "msd-spleen-ct")],
                "MR": [str(sample / "mr"), str(chaos)]}
        config = run_config("a", dirs, out / "all", steps, args)
        seconds = trained(config)
        print(f"{out / 'all' / 'last.pt'}: trained on all the data in {seconds / 60:.1f} min")
        return 0
    folds = chaos_split(chaos, out, args.seed)
    folder, settings, outputs = inference(args)
    rows: dict[str, dict] = {}
    for run in args.runs:
        variant, k = run[0], int(run[-1])
        train_ids, test_ids = folds[k]["train"], folds[k]["val"]
        stage = out / "data" / f"fold{k}"
        chaos_train = staged(chaos, train_ids, stage / "chaos_train")
        held_out = {"CHAOS MR": ("MR", staged(chaos, test_ids, stage / "chaos_test")),
                    "ts-ct-slab": ("CT", data / "ts-ct-slab"), "msd-spleen-ct": ("CT", data / "msd-spleen-ct"),
                    FIT[0]: ("MR", chaos_train)}
        dirs = {"CT": [str(sample / "ct")], "MR": [str(sample / "mr"), str(chaos_train)]}
        config = run_config(variant, dirs, out / run, steps, args)
        print(f"{run}: {config.epochs} epochs ({config.mode}, --augment {config.augment}), held out: "
              f"{', '.join(test_ids)}", file=sys.stderr, flush=True)
        seconds = trained(config)
        scores = held_out_scores(out / run / "last.pt", held_out, out / run / folder, settings, outputs)
        rows[run] = {"scores": scores, "seconds": seconds}
    for variant in sorted({run[0] for run in args.runs}):
        both = pooled(rows, variant)
        if both is not None:
            rows[f"{variant}, both folds"] = both
    text = (f"Held-out cases: CHAOS MR patients not trained on (fold split in {out / 'splits.json'}); the CT sets are "
            f"other patients' scans; {FIT[0]}: the fold's training CHAOS patients, not held out (does the model fit "
            "what it trained on?). Each cell: mean ± std over the cases.\n\n"
            f"Dice:\n\n{table(rows, 'dice')}\nNSD at 2 mm:\n\n{table(rows, 'nsd')}")
    recipe = ", ".join(f"{k}={v}" for k, v in {**RECIPE, "steps": steps}.items())
    changes = [f"variant {v}: " + ", ".join(f"{k}={x}" for k, x in AUGMENT[v].items())
               for v in sorted({run[0] for run in args.runs} & set(AUGMENT))]
    report("Held-out accuracy (bench/heldout.py)", torch.device("cpu"), text,
           [f"recipe: {recipe}", *changes,
            f"inference: infer.py's defaults, sliding-window overlap {args.overlap:g}"
            + (", --keep_largest (every class its largest component)" if args.keep_largest else "")],
           write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
