"""Train MulModSeg on unpaired CT and MR folders: ``python train.py --ct_dir CT --mr_dir MR --out runs/x`` or
``mulmodseg-train ...`` (the same ``main``). A command line over ``mulmodseg.config`` and ``mulmodseg.training``; see
``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys

from mulmodseg.augment import parse_overrides
from mulmodseg.cli import (
    CHANNELS_LAST,
    EXIT_BAD_ARGUMENTS,
    EXIT_CODES_HELP,
    HelpFormatter,
    add_cpu_speed_arguments,
    add_version_argument,
    run,
)
from mulmodseg.config import (
    AUGMENTATIONS,
    BUNDLED_SAMPLE,
    DEFAULT_FOLDS,
    TrainConfig,
    TrainingError,
    absolute_paths,
    run_dir,
)
from mulmodseg.device import set_threads
from mulmodseg.errors import UserError
from mulmodseg.runlog import how_to_go_on, write_curves
from mulmodseg.text.clip import ACTIVATIONS
from mulmodseg.training import train


def parse_pairs(pairs: list[str], flag: str, cast=str) -> dict:
    """``["CT=70", "MR=35"]`` -> ``{"CT": 70, "MR": 35}``."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise TrainingError(f"{flag} expects NAME=VALUE, got {pair!r}")
        try:
            out[name] = cast(value)
        except ValueError:
            raise TrainingError(f"{flag} {pair}: {value!r} is not a valid {cast.__name__}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description="Train one segmentation model on unpaired CT and MR scans (MulModSeg, alternating training).",
        formatter_class=HelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    add_version_argument(p)
    g = p.add_argument_group("data")
    g.add_argument("--ct_dir", nargs="+", metavar="DIR",
                   help="CT dataset folder(s) (imagesTr/labelsTr, MSD dataset.json, or <id>.nii.gz + <id>_gt.nii.gz); "
                   "each folder is one dataset, labelling the classes its dataset.json 'labels' names (all without "
                   "one; see --labelled). Without --ct_dir and --mr_dir the bundled sample (data/sample) is used")
    g.add_argument("--mr_dir", nargs="+", metavar="DIR", help="MR dataset folder(s), same layouts as --ct_dir")
    g.add_argument("--data_dir", action="append", default=[], metavar="MODALITY=DIR",
                   help="a dataset folder of any modality name (repeatable, also to give a modality several "
                   "folders), e.g. PET=/data/pet")
    g.add_argument("--labelled", action="append", default=[], metavar="DIR=CLASS,CLASS",
                   help="the classes a dataset folder labels, overriding its dataset.json (repeatable), e.g. "
                   "/data/chaos=liver,spleen,right_kidney,left_kidney: its 0s are then background or an unlabelled "
                   "class, and the loss counts only what it labels (marginal loss)")
    g.add_argument("--classes", default=d.classes,
                   help="class names: amos, amos_reference (the reference's spellings), mmwhs, "
                   "or a file with one name per line or a JSON list (background first)")
    g.add_argument("--label_map", default=d.label_map,
                   help="map label values, JSON file or 'src:dst,...' (MMWHS: 205:1,420:2,...)")
    g.add_argument("--max_cases", action="append", default=[], metavar="MODALITY=N",
                   help="keep N training cases of a modality, drawn with --seed after --val_fraction holds its share "
                   "out (CT:MR ratio experiments)")
    g.add_argument("--val_fraction", type=float, default=d.val_fraction,
                   help="fraction of cases held out for validation, drawn with --seed; refused where a folder's "
                   "dataset.json has a validation list (that list is the validation set) and with --fold")
    g.add_argument("--fold", type=int, default=d.fold, metavar="K",
                   help="cross-validation: train fold K (0-based) into OUT/fold_K, validating on that fold's scans "
                   "after the last epoch (and every --val_every), which writes OUT/fold_K/validation/MODALITY/ "
                   "metrics.csv and summaries; the split is OUT/splits.json, made by the first fold (each "
                   "modality's scans in --num_folds folds drawn with --seed) and reused by the others. The fold wins "
                   "over a dataset.json's validation list, which is then left unused; --max_cases subsamples the "
                   "fold's training scans")
    g.add_argument("--num_folds", type=int, default=d.num_folds, metavar="N",
                   help=f"with --fold: the number of folds (default {DEFAULT_FOLDS}, or the count in --splits or in "
                   "an existing OUT/splits.json, which must agree with it)")
    g.add_argument("--splits", default=d.splits, metavar="FILE",
                   help='with --fold: your own split, {"CT": [{"train": [ids], "val": [ids]}, ...one per fold], '
                   '"MR": [...]} (nnU-Net\'s splits_final.json per modality); checked (ids exist, no scan in two '
                   "validation folds) and copied to OUT/splits.json, which it must equal when that exists")
    g.add_argument("--spacing", type=float, nargs=3, default=d.spacing, help="target voxel spacing in mm (RAS axes)")
    g.add_argument("--ct_window", type=float, nargs=2, default=d.ct_window,
                   help="CT intensity window in HU, scaled to [0, 1]")
    g.add_argument("--mr_percentiles", type=float, nargs=2, default=d.mr_percentiles,
                   help="MR clipping percentiles, then min-max to [0, 1]")
    g.add_argument("--cache_dir", default=d.cache_dir, help="preprocessed-volume cache (default: OUT/cache)")
    g.add_argument("--num_workers", type=int, default=d.num_workers, help="data loader worker processes per modality")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=["unet", "swinunetr"], default=d.backbone, help="vision backbone")
    g.add_argument("--feature_size", type=int, default=d.feature_size, help="SwinUNETR feature size (multiple of 12)")
    g.add_argument("--base_channels", type=int, default=d.base_channels,
                   help="UNet width: channels of the first conv (the paper's 32)")
    g.add_argument("--text", default=d.text,
                   help="class embeddings: clip (CLIP ViT-B/32 prompts), onehot, none (vision-only), or a saved table "
                   "file")
    g.add_argument("--clip_weights", default=d.clip_weights,
                   help="CLIP ViT-B/32 weights (OpenAI ViT-B-32.pt, open_clip or Hugging Face files); without it "
                   "--text clip downloads the official file once")
    g.add_argument("--clip_activation", choices=sorted(ACTIVATIONS), default=d.clip_activation,
                   help="the text tower's MLP activation, overriding what the weights' files say (default: "
                   "quick_gelu, OpenAI's, unless a Hugging Face config.json names another); open_clip's nn.GELU "
                   "models such as LAION's need gelu")
    g.add_argument("--template", default=d.template, help="prompt template: v1, v2, v3 or a text with {mod} and {cls}")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward to save memory: the SwinUNETR blocks and the head (the "
                   "UNet's BatchNorm stages are not recomputed)")
    g.add_argument("--norm_stats", choices=["per_modality", "shared"], default=d.norm_stats,
                   help="UNet BatchNorm running statistics: one set per modality (affine weights shared), or one set "
                   "pooled over all modalities, which fits neither at inference (bench/learn.py measures both); "
                   "SwinUNETR uses InstanceNorm and ignores this")

    g = p.add_argument_group("optimisation")
    g.add_argument("--mode", default=d.mode,
                   help="alt (one batch per modality in turn), mix (mixed batches), or a modality name to train on it "
                   "alone")
    g.add_argument("--modality_order", nargs="+", default=d.modality_order,
                   help="ALT order of modalities (default: CT, MR, then --data_dir order)")
    g.add_argument("--roi_size", type=int, nargs="+", default=list(d.roi_size), help="crop size: one number or three")
    g.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="volumes per step; each gives --num_samples crops")
    g.add_argument("--num_samples", type=int, default=d.num_samples,
                   help="crops per volume (positive:negative centres 1:1)")
    g.add_argument("--positive_centres", choices=["class", "voxel"], default=d.positive_centres,
                   help="where positive crops centre: class (a class present in the scan drawn uniformly, then one of "
                   "its voxels, as nnU-Net oversamples) or voxel (uniform over labelled voxels, the reference's, which "
                   "centres most crops on the liver)")
    g.add_argument("--augment", choices=list(AUGMENTATIONS), default=d.augment,
                   help="training augmentation: paper (the paper's: intensity shift and scale of half the crops, plus "
                   "the --rotate_degrees/--scale_range warp when given), nnunet (nnU-Net v2's default set: rotation, "
                   "scaling, noise, blur, brightness, contrast, low resolution, gamma, batched on the training device; "
                   "mirroring follows --mirror_axes; see docs/augmentation.md), or none")
    g.add_argument("--augment_set", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                   help="change --augment nnunet's settings (repeatable), e.g. rotation_p=0.3,scale_range=0.8:1.25; "
                   "the names and nnU-Net's values are in docs/augmentation.md")
    g.add_argument("--rotate_degrees", type=float, default=d.rotate_degrees,
                   help="random rotation about the S/I axis up to this angle (the reference's CT augmentation used 6)")
    g.add_argument("--scale_range", type=float, default=d.scale_range,
                   help="random per-axis scaling by 1 +- this (the reference's CT augmentation used 0.1)")
    g.add_argument("--warp_modalities", nargs="+", default=d.warp_modalities, metavar="MODALITY",
                   help="modalities that get --rotate_degrees/--scale_range (default: all; the reference: CT)")
    g.add_argument("--warp_prob", type=float, default=d.warp_prob,
                   help="share of crops that get --rotate_degrees/--scale_range (the reference's: 1)")
    g.add_argument("--fov_prob", type=float, default=d.fov_prob,
                   help="share of crops cut to a random box around their centre (image 0 and background outside), "
                   "as a slab or a cropped scan looks once padded to the window; with any --augment. Default: "
                   "off, as the paper")
    g.add_argument("--fov_min", type=float, default=d.fov_min,
                   help="the --fov_prob box's least length per axis, as a share of the crop's (0.2 of 48 voxels of "
                   "4.5 mm: 45 mm)")
    g.add_argument("--remap_prob", type=float, default=d.remap_prob,
                   help="share of crops whose [0, 1] intensities go through a random piecewise-linear curve that "
                   "may reorder the tissues' brightness, so that shape and place, not brightness, tell the organs "
                   "apart (another MR sequence, a contrast phase); with any --augment. Default: off, as the paper")
    g.add_argument("--mirror_axes", type=int, nargs="*", default=list(d.mirror_axes), metavar="AXIS",
                   help="mirror crops along these RAS axes (0 left/right, 1 front/back, 2 up/down), each with "
                   "probability 0.5, the labels unchanged (as nnU-Net: a right kidney stays right kidney, told by "
                   "the anatomy around it). infer.py --tta mirrors the same axes. Default: none, as the reference")
    g.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    g.add_argument("--warmup_epochs", type=int, default=d.warmup_epochs,
                   help="linear warm-up epochs before the cosine decay")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=d.grad_clip, help="clip the gradient norm to this (0: off)")
    g.add_argument("--max_skipped_steps", type=int, default=d.max_skipped_steps,
                   help="a step whose gradient is not finite or has a norm above 1e15 is skipped (counted per modality "
                   "in the log); this many in a row stop the run, its last checkpoint kept")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=d.amp,
                   help="mixed precision (auto: bf16 on Ampere or newer GPUs, fp16 on older ones; on the CPU bf16 "
                   "only with AMX: AVX512-BF16 without AMX has given corrupt bf16 gradients, so fp32 there)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for weights, splits and crops")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (gpu and gpu:N: the same as cuda)")
    add_cpu_speed_arguments(g)

    g = p.add_argument_group("run directory")
    g.add_argument("--out", default=d.out, help="run directory for checkpoints, logs, config and curves "
                   "(with --fold K: the study's folder, holding splits.json and the run directory fold_K)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--save_every", type=int, default=d.save_every, help="write last.pt every N epochs")
    g.add_argument("--keep_every", type=int, default=d.keep_every,
                   help="also keep epoch_N.pt every N epochs (0: never)")
    g.add_argument("--val_every", type=int, default=d.val_every,
                   help="validate every N epochs (0: never, but a --fold run "
                   "validates after its last epoch) on the validation set (--fold's, else a dataset.json's validation "
                   "list, else --val_fraction's), writing RUN/validation/MODALITY/metrics.csv and summaries (Dice on "
                   "the training grid); keeps best.pt")
    g.add_argument("--sw_batch_size", type=int, default=d.sw_batch_size, help="windows per forward in validation")
    g.add_argument("--log_every", type=int, default=d.log_every, help="progress line every N steps")
    g.add_argument("--plot_only", action="store_true",
                   help="only redraw OUT/curves.png from OUT/log.jsonl (e.g. during a run)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's ``TrainConfig`` from parsed flags (bundled sample when no folder is given), its folders
    and files as absolute paths (``absolute_paths``)."""
    dirs: dict[str, list[str]] = {}
    if args.ct_dir:
        dirs["CT"] = list(args.ct_dir)
    if args.mr_dir:
        dirs["MR"] = list(args.mr_dir)
    for pair in args.data_dir:
        (name, folder), = parse_pairs([pair], "--data_dir").items()
        dirs.setdefault(name, []).append(folder)
    if not dirs:
        if not args.resume:  # a resumed run keeps its own folders
            print(f"no --ct_dir/--mr_dir given: training on the bundled sample in {BUNDLED_SAMPLE}", file=sys.stderr)
        dirs = {"CT": str(BUNDLED_SAMPLE / "ct"), "MR": str(BUNDLED_SAMPLE / "mr")}
    roi = args.roi_size * 3 if len(args.roi_size) == 1 else args.roi_size
    if len(roi) != 3:
        raise TrainingError(f"--roi_size takes one or three numbers, got {args.roi_size}")
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields.update(
        data_dirs=dirs, roi_size=tuple(roi), spacing=tuple(args.spacing), ct_window=tuple(args.ct_window),
        mirror_axes=tuple(args.mirror_axes), channels_last=CHANNELS_LAST[args.channels_last],
        mr_percentiles=tuple(args.mr_percentiles), max_cases=parse_pairs(args.max_cases, "--max_cases", int),
        augment_options=augment_options(args.augment_set),
        labelled={os.path.abspath(os.path.expanduser(folder)): [c.strip() for c in names.split(",") if c.strip()]
                  for folder, names in parse_pairs(args.labelled, "--labelled").items()},
    )
    return absolute_paths(TrainConfig(**fields))


def augment_options(texts: list[str]) -> dict[str, str]:
    """``--augment_set`` values -> {setting: value as text} (checked with the other settings in check_config)."""
    try:
        return {name: value for text in texts for name, value in parse_overrides(text).items()}
    except ValueError as error:
        raise TrainingError(f"--augment_set: {error}") from None


def given_fields(argv: list[str] | None) -> set[str]:
    """The ``TrainConfig`` fields that ``argv`` sets explicitly (a resumed run keeps the others)."""
    probe = build_parser()
    for action in probe._actions:  # no defaults: only what argv sets lands in the namespace
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_args(argv)))
    if given & {"ct_dir", "mr_dir", "data_dir"}:
        given.add("data_dirs")
    if "augment_set" in given:
        given.add("augment_options")
    return given & set(TrainConfig.__dataclass_fields__)


def main(argv: list[str] | None = None) -> int:
    """train.py and ``mulmodseg-train``: train (or ``--plot_only``) from ``argv`` (default: the command line);
    returns the exit status (``mulmodseg.cli``)."""
    args = build_parser().parse_args(argv)
    out = run_dir(args.out, args.fold)
    if args.plot_only:
        log = out / "log.jsonl"
        if not log.is_file():
            print(f"error: {log} does not exist yet", file=sys.stderr)
            return EXIT_BAD_ARGUMENTS
        write_curves(log, out / "curves.png")
        print(out / "curves.png")
        return 0

    def work() -> None:
        set_threads(args.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        train(config_from_args(args), resume=args.resume, given=given_fields(argv))

    # Not ValueError: the checks raise TrainingError, so a ValueError out of training is a bug, with its traceback.
    return run(work, lambda error: how_to_go_on(out), errors=(UserError, OSError))
