"""Segment CT or MR scans with a trained checkpoint: ``python infer.py --checkpoint runs/x/last.pt --modality MR
-i scan.nii.gz -o out/`` or ``mulmodseg-predict ...`` (the same ``main``). A command line over
``mulmodseg.predict``; see ``--help``.
"""

from __future__ import annotations

import argparse

from mulmodseg.cli import (
    CHANNELS_LAST,
    EXIT_CODES_HELP,
    HelpFormatter,
    add_cpu_speed_arguments,
    add_version_argument,
    run,
)
from mulmodseg.device import set_threads
from mulmodseg.errors import DiskFullError
from mulmodseg.outputs import OutputOptions, find_inputs
from mulmodseg.predict import InferenceInterrupted, InferenceSettings, segment_files


def build_parser() -> argparse.ArgumentParser:
    d = InferenceSettings()
    p = argparse.ArgumentParser(
        description="Segment NIfTI scans with a MulModSeg checkpoint; label maps are written on each input's own grid.",
        formatter_class=HelpFormatter, epilog=EXIT_CODES_HELP,
    )
    add_version_argument(p)
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                   help="a checkpoint written by train.py (last.pt or best.pt), or several (e.g. the folds of train.py "
                   "--fold): their ensemble averages the models' softmax probabilities (on the training grid when "
                   "their preprocessing agrees, else each restored to the scan's grid first), refused when their "
                   "classes, modalities or label maps differ")
    p.add_argument("--modality", required=True, help="the scans' modality, as named in training (CT, MR, ...)")
    p.add_argument("-i", "--input", required=True, help="a .nii/.nii.gz file or a folder of them (never modified)")
    p.add_argument("-o", "--output", required=True, help="folder for the label maps, named like the inputs, and "
                   "dataset.json (class name -> value in the label maps, the checkpoint and settings used); not a "
                   "folder of the inputs or labels, nor inside a dataset's imagesTr/labelsTr/imagesTs/labelsTs")
    p.add_argument("--into_input_folder", action="store_true",
                   help="write into --output even where it is a folder of the inputs (refused without this flag)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never replaced)")
    again.add_argument("--skip_existing", action="store_true",
                       help="continue an interrupted run into the same --output: scans whose outputs all exist are not "
                       "segmented again (with --labels they are scored from those files)")
    p.add_argument("--labels", help="folder of ground-truth label maps with the inputs' names: writes metrics.csv "
                   "(Dice, NSD and HD95 per case and class), summary.md and summary.csv (mean and std per class, the "
                   "paper's table layout) and summary.json")
    p.add_argument("--labelled", nargs="+", metavar="CLASS",
                   help="with --labels: the classes the labels label (default: the labels of a dataset.json in or "
                   "above the --labels folder, else all); the others are 'not labelled' in the tables, and "
                   "predicting them is no error")
    p.add_argument("--nsd_tolerance", type=float, default=2.0,
                   help="with --labels: the normalised surface Dice's tolerance in mm")
    p.add_argument("--keep_largest", nargs="*", metavar="CLASS",
                   help="postprocessing: keep only the largest 26-connected component of these classes (names, with "
                   "spaces or underscores, or values as the label map holds them; all classes when none is named); "
                   "for organs that are one piece (liver, spleen, stomach), not for paired or fragmented ones")
    p.add_argument("--min_component_mm3", type=float, metavar="V",
                   help="postprocessing: remove every component of a class smaller than V mm^3")
    p.add_argument("--per_class", action="store_true",
                   help="also write NAME/<class>.nii.gz: one binary (0/1) uint8 map per class on the input's grid, "
                   "spaces in class names as underscores")
    p.add_argument("--statistics", action="store_true",
                   help="also write NAME_statistics.json: each class's volume in mm^3, voxel count and mean input "
                   "intensity on the input's grid")
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write NAME_probabilities.npz: softmax (classes, X, Y, Z) as float16 on the input's voxel "
                   "grid (an ensemble's mean)")
    p.add_argument("--num_parts", type=int, default=1, metavar="P",
                   help="share --input between P processes (GPUs, machines, a job array) writing one --output: each "
                   "segments every P-th scan by sorted file name; refused with --labels: score the folder when all "
                   "parts are done, with python -m mulmodseg.evaluate or a last run without --num_parts, with "
                   "--skip_existing --labels")
    p.add_argument("--part_id", type=int, default=0, metavar="I",
                   help="with --num_parts: this process's part, 0 to P-1")
    p.add_argument("--preview", action="store_true",
                   help="also write NAME.png: the labels over three orthogonal slices, with a legend of the classes "
                   "present")
    p.add_argument("--tta", action="store_true", help="test-time mirroring: average over every combination of mirrors "
                   "along the axes the checkpoint was trained with (train.py --mirror_axes; 2^N times slower); "
                   "refused for a checkpoint trained without mirroring")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (gpu and gpu:N: the same as cuda)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=d.amp,
                   help="mixed precision (auto: bf16 on Ampere or newer GPUs, fp16 on older ones; on the CPU bf16 "
                   "where it has bf16 matrix units, AMX or AVX512-BF16, else none)")
    add_cpu_speed_arguments(p)
    p.add_argument("--sw_batch_size", type=int, default=d.sw_batch_size, help="windows per forward pass (at least 1)")
    p.add_argument("--overlap", type=float, default=d.overlap, help="sliding-window overlap in [0, 1)")
    p.add_argument("--mode", choices=["gaussian", "constant"], default=d.mode, help="window blending")
    p.add_argument("--prompt_modality", help="use another modality's prompts (the paper's wrong-modality test)")
    return p


def with_skip_existing(args: argparse.Namespace) -> str:
    """How the same command continues into ``--output``: with --skip_existing (instead of --overwrite)."""
    return "with --skip_existing instead of --overwrite" if args.overwrite else "with --skip_existing"


def interrupted_hint(error: KeyboardInterrupt, args: argparse.Namespace) -> str:
    """What Ctrl-C leaves behind and how to go on: the cases complete in ``--output`` and the command that
    segments the rest."""
    if not isinstance(error, InferenceInterrupted):
        return "no case was segmented yet"
    if not error.complete:
        return f"no case is complete in {args.output}; run the same command again"
    again = with_skip_existing(args)
    if not error.remaining:
        return f"every case is complete in {args.output}; run the same command {again} to write the evaluation tables"
    return (f"{len(error.complete)} of {len(error.complete) + len(error.remaining)} cases are complete in "
            f"{args.output} ({', '.join(p.name for p in error.complete)}); run the same command {again} to segment "
            f"the other {len(error.remaining)}")


def full_disk_hint(error: Exception, args: argparse.Namespace) -> str:
    """After a full disk's message (``DiskFullError``): free space, then continue into ``--output``."""
    if not isinstance(error, DiskFullError):
        return ""
    return (f"; free space there, then run the same command {with_skip_existing(args)}: the cases complete in "
            f"{args.output} are kept")


def main(argv: list[str] | None = None) -> int:
    """infer.py and ``mulmodseg-predict``: segment the scans ``argv`` names (default: the command line);
    returns the exit status (``mulmodseg.cli``)."""
    args = build_parser().parse_args(argv)

    def work() -> None:
        set_threads(args.threads)
        settings = InferenceSettings(
            sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode=args.mode, tta=args.tta,
            device=args.device, amp=args.amp, channels_last=CHANNELS_LAST[args.channels_last],
            prompt_modality=args.prompt_modality,
        )
        outputs = OutputOptions(
            probabilities=args.save_probabilities, preview=args.preview, per_class=args.per_class,
            statistics=args.statistics, keep_largest=args.keep_largest, min_component_mm3=args.min_component_mm3,
        )
        segment_files(
            args.checkpoint, find_inputs(args.input), args.output, args.modality, settings, outputs,
            overwrite=args.overwrite, skip_existing=args.skip_existing, labels_dir=args.labels,
            labelled=args.labelled, nsd_tolerance=args.nsd_tolerance, num_parts=args.num_parts,
            part_id=args.part_id, into_input_folder=args.into_input_folder,
        )

    # ValueError included (run's default): a value that cannot work, such as --overlap 1.
    return run(work, lambda error: interrupted_hint(error, args), lambda error: full_disk_hint(error, args))
