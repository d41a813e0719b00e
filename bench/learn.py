"""Does a model trained with mulmodseg segment? Train on the bundled real CT + MR, score with infer's path.

One invocation trains the same seeded run once per ``--norm_stats`` variant (UNet base 8, one-hot text,
ALT, class-balanced crop centres, 4.5 mm, 4 x 64^3 crops, lr 3e-3 for this short schedule), then
segments both training scans with ``predict.Segmenter`` (eval mode, restored to each scan's own grid,
exactly what ``infer.py`` writes with its default settings: on a CPU with bf16 units that is bf16) and
prints per-organ Dice against the scans' labels. Each model is read three ways: ``eval`` (infer.py's
defaults), ``eval fp32`` (``--amp none``; the label maps' voxel agreement with ``eval`` is reported), and
``batch``, BatchNorm normalising every batch of windows by its own statistics (as training does; the
running averages untouched): the level that running statistics should reach. The table goes to
``bench/RESULTS.md`` with the machine.

These are the training scans: a fit check of the whole path (sampling, normalisation, restoration),
not a measure of generalisation. Targets: mean Dice over liver, spleen, both kidneys and stomach
>= 0.75 on the CT and on the MR with the default normalisation, and its eval reading within 0.02 of
its batch-statistics reading for every organ.

    python bench/learn.py                          # about 2 x 21 min on a 2-core CPU
    python bench/learn.py --variants per_modality  # the README's main command's training alone
    python bench/learn.py --score_only             # score the checkpoints of an earlier run in --out again
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import format_table, report

from mulmodseg import data as mdata
from mulmodseg.config import BUNDLED_SAMPLE, TrainConfig
from mulmodseg.metrics import dice_per_class
from mulmodseg.nets.unet3d import DomainBatchNorm3d
from mulmodseg.predict import InferenceSettings, Segmenter
from mulmodseg.training import train

SCANS = {"CT": "ts_ct_001.nii.gz", "MR": "ts_mr_001.nii.gz"}
READINGS = ("eval", "eval fp32", "batch")
# AMOS ids of the organs the target averages: spleen, right kidney, left kidney, liver, stomach.
TARGET_ORGANS = (1, 2, 3, 6, 7)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["per_modality", "shared"], choices=["per_modality", "shared"],
                   help="--norm_stats of each training (the first is the default being checked)")
    p.add_argument("--epochs", type=int, default=250, help="ALT epochs (one CT and one MR step each)")
    p.add_argument("--warmup_epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (train.py's 1e-3 is for 1000 epochs)")
    p.add_argument("--base_channels", type=int, default=8)
    p.add_argument("--spacing", type=float, default=4.5, help="isotropic training spacing in mm")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--positive_centres", default="class", choices=["class", "voxel"])
    p.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="training precision (inference is fp32)")
    p.add_argument("--no-channels_last", dest="channels_last", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/learn", help="run folders go here, one per variant (must not exist)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--score_only", action="store_true",
                   help="train nothing: score OUT/<variant>/last.pt of an earlier run with today's inference code")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.warmup_epochs, args.base_channels, args.roi, args.num_samples = 1, 1, 2, 32, 1
        args.no_write = True
    return args


def config(args: argparse.Namespace, norm_stats: str) -> TrainConfig:
    """The training run of one variant."""
    return TrainConfig(
        data_dirs={name: str(BUNDLED_SAMPLE / name.lower()) for name in SCANS},
        out=str(Path(args.out) / norm_stats), backbone="unet", base_channels=args.base_channels, text="onehot",
        roi_size=(args.roi,) * 3, num_samples=args.num_samples, epochs=args.epochs,
        warmup_epochs=args.warmup_epochs, lr=args.lr, spacing=(args.spacing,) * 3, amp=args.amp,
        channels_last=args.channels_last, norm_stats=norm_stats, positive_centres=args.positive_centres,
        num_workers=0, seed=args.seed, log_every=50, device="cpu",
    )


def use_batch_statistics(model: torch.nn.Module) -> None:
    """Make every BatchNorm normalise with the statistics of the batch it gets, leaving its running
    averages as they are (momentum 0), while the rest of the model stays in eval mode."""
    for module in model.modules():
        if isinstance(module, DomainBatchNorm3d):
            module.train()
            module.momentum = 0.0


def score(checkpoint: Path, reading: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(Dice per class (13,), label map) of each training scan, segmented as infer.py does, on the
    scan's own grid. reading: "eval" (infer.py's defaults), "eval fp32" or "batch" (batch statistics)."""
    settings = InferenceSettings(device="cpu", amp="none" if reading == "eval fp32" else "auto")
    segmenter = Segmenter(checkpoint, settings)
    if reading == "batch":
        use_batch_statistics(segmenter.model)
    scores = {}
    for modality, name in SCANS.items():
        image = BUNDLED_SAMPLE / modality.lower() / "imagesTr" / name
        label, _, _ = segmenter.segment(image, modality)
        reference = mdata.load_volume(image)
        truth = mdata.read_label(mdata.load_volume(image.parent.parent / "labelsTr" / name), name, reference, None)
        scores[modality] = dice_per_class(label, truth, len(segmenter.classes)), label
    return scores


def fp32_worst(fast: tuple[np.ndarray, np.ndarray], fp32: tuple[np.ndarray, np.ndarray], classes: list[str]) -> str:
    """The organ whose Dice moves most between two readings ``(dice (13,), label map)``, with the voxels the two
    label maps give it (a Dice change on a small organ is a handful of voxels)."""
    k = int(np.nanargmax(np.abs(fast[0] - fp32[0])))
    differ = int(np.count_nonzero((fast[1] == k + 1) != (fp32[1] == k + 1)))
    return f"{classes[k]}: {differ} of its {int(np.count_nonzero(fp32[1] == k + 1))} fp32 voxels differ"


def organ_mean(dice: np.ndarray) -> float:
    return float(np.nanmean([dice[k - 1] for k in TARGET_ORGANS]))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, results, times = [], {}, {}
    classes = None
    for variant in args.variants:
        cfg = config(args, variant)
        if not args.score_only:
            t0 = time.time()
            train(cfg, log=lambda msg: print(f"[{variant}] {msg}", flush=True))
            times[variant] = time.time() - t0
        checkpoint = Path(cfg.out) / "last.pt"
        for reading in READINGS:
            results[variant, reading] = score(checkpoint, reading)
        classes = classes or torch.load(checkpoint, weights_only=False, map_location="cpu")["config"]["classes"][1:]
    for (variant, reading), scores in results.items():
        for modality, (dice, _) in scores.items():
            cells = ["-" if np.isnan(v) else round(float(v), 2) for v in dice]
            rows.append([variant, reading, modality, *cells, round(organ_mean(dice), 3)])
    header = ["norm_stats", "reading", "scan", *classes, "mean of 5"]
    default = args.variants[0]
    dice = {(reading, m): results[default, reading][m][0] for reading in READINGS for m in SCANS}
    gaps = {m: np.nanmax(np.abs(dice["eval", m] - dice["batch", m])) for m in SCANS}
    fp32 = {m: np.nanmax(np.abs(dice["eval", m] - dice["eval fp32", m])) for m in SCANS}
    worst = {m: fp32_worst(results[default, "eval"][m], results[default, "eval fp32"][m], classes) for m in SCANS}
    agree = {m: np.mean(results[default, "eval"][m][1] == results[default, "eval fp32"][m][1]) for m in SCANS}
    steps = 2 * args.epochs
    trained = (f"training: {', '.join(f'{v} {times[v] / 60:.1f} min ({steps / times[v]:.2f} steps/s)' for v in times)}"
               if times else f"no training in this run: the checkpoints of an earlier run in {args.out}, scored again")
    notes = [f"{trained}; "
             f"{steps} steps each (UNet base {args.base_channels}, {args.spacing:g} mm, {args.num_samples} x "
             f"{args.roi}^3 crops, one-hot text, ALT, {args.positive_centres} crop centres, amp {args.amp}, "
             f"channels_last {args.channels_last}, lr {args.lr:g}, warm-up {args.warmup_epochs}, seed {args.seed})",
             "scored with predict.Segmenter on the training scans, on their own grids (a fit check, not "
             "generalisation); eval: infer.py's defaults (amp auto: bf16 on a CPU with bf16 units); mean of 5: spleen, "
             "kidneys R/L, liver, stomach",
             f"targets for {default}: mean of 5 >= 0.75 on CT ({organ_mean(dice['eval', 'CT']):.3f}) and "
             f"MR ({organ_mean(dice['eval', 'MR']):.3f}); eval within 0.02 of batch for every organ "
             f"(largest gap CT {gaps['CT']:.3f}, MR {gaps['MR']:.3f})",
             f"eval vs eval fp32 for {default}: largest Dice difference CT {fp32['CT']:.4f} ({worst['CT']}), "
             f"MR {fp32['MR']:.4f} ({worst['MR']}); "
             f"label-map voxel agreement CT {100 * agree['CT']:.3f} %, MR {100 * agree['MR']:.3f} %"]
    report("Learning on the bundled sample (bench/learn.py)", torch.device("cpu"), format_table(header, rows), notes,
           write=not args.no_write)
    return {"results": results, "times": times}


if __name__ == "__main__":
    main()
