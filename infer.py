"""Segment CT or MR scans with a trained checkpoint: ``python infer.py --checkpoint runs/x/last.pt --modality MR
--input scan.nii.gz --output out/``. A thin command line over ``mulmodseg.predict``; see ``--help``.
"""

from __future__ import annotations

import argparse
import sys

from mulmodseg.checkpoint import CheckpointError
from mulmodseg.cli import CHANNELS_LAST, HelpFormatter, add_cpu_speed_arguments
from mulmodseg.data import DataError
from mulmodseg.device import set_threads
from mulmodseg.predict import InferenceSettings, find_inputs, segment_files


def build_parser() -> argparse.ArgumentParser:
    d = InferenceSettings()
    p = argparse.ArgumentParser(
        description="Segment NIfTI scans with a MulModSeg checkpoint; label maps are written on each input's own grid.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (last.pt or best.pt)")
    p.add_argument("--modality", required=True, help="the scans' modality, as named in training (CT, MR, ...)")
    p.add_argument("--input", required=True, help="a .nii/.nii.gz file or a folder of them (never modified)")
    p.add_argument("--output", required=True, help="folder for the label maps, named like the inputs")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never replaced)")
    again.add_argument("--skip_existing", action="store_true",
                       help="continue an interrupted run into the same --output: scans whose outputs all exist are not "
                       "segmented again (with --labels they are scored from those files)")
    p.add_argument("--labels", help="folder of ground-truth label maps with the inputs' names: writes metrics.csv (Dice, NSD and HD95 per case and class), summary.md and summary.csv (mean and std per class, the paper's table layout) and summary.json")
    p.add_argument("--nsd_tolerance", type=float, default=2.0, help="with --labels: the normalised surface Dice's tolerance in mm")
    p.add_argument("--save_probabilities", action="store_true", help="also write NAME_probabilities.npz: softmax (classes, X, Y, Z) as float16 on the input's voxel grid")
    p.add_argument("--preview", action="store_true", help="also write NAME.png: the labels over three orthogonal slices")
    p.add_argument("--tta", action="store_true", help="test-time mirroring: average over every combination of mirrors "
                   "along the axes the checkpoint was trained with (train.py --mirror_axes; 2^N times slower), a "
                   "left/right mirror swapping paired classes back; refused for a checkpoint trained without mirroring")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=d.amp,
                   help="mixed precision (auto: bf16 on Ampere or newer GPUs, fp16 on older ones; on the CPU bf16 "
                   "where it has bf16 matrix units, AMX or AVX512-BF16, else none)")
    add_cpu_speed_arguments(p)
    p.add_argument("--sw_batch_size", type=int, default=d.sw_batch_size, help="windows per forward pass (at least 1)")
    p.add_argument("--overlap", type=float, default=d.overlap, help="sliding-window overlap in [0, 1)")
    p.add_argument("--mode", choices=["gaussian", "constant"], default=d.mode, help="window blending")
    p.add_argument("--prompt_modality", help="use another modality's prompts (the paper's wrong-modality test)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
        settings = InferenceSettings(
            sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode=args.mode, tta=args.tta,
            device=args.device, amp=args.amp, channels_last=CHANNELS_LAST[args.channels_last],
            prompt_modality=args.prompt_modality,
        )
        segment_files(
            args.checkpoint, find_inputs(args.input), args.output, args.modality, settings,
            overwrite=args.overwrite, save_probabilities=args.save_probabilities, previews=args.preview,
            labels_dir=args.labels, skip_existing=args.skip_existing, nsd_tolerance=args.nsd_tolerance,
        )
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while writing
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
