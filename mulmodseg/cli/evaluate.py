"""Score label maps against reference labels, without a model: ``python -m mulmodseg.evaluate --pred DIR --labels
DIR`` or ``mulmodseg-evaluate ...`` (the same ``main``). A command line over ``mulmodseg.scoring.evaluate_folders``;
see ``--help``.
"""

from __future__ import annotations

import argparse

from mulmodseg.cli import EXIT_CODES_HELP, HelpFormatter, add_version_argument, program_name, run
from mulmodseg.scoring import evaluate_folders


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("mulmodseg.evaluate"),
        description="Score label maps against reference labels (no model needed): Dice, NSD and HD95 per case "
        "and class on each label's voxel grid, written to metrics.csv, summary.md, summary.csv and summary.json.",
        formatter_class=HelpFormatter, epilog=EXIT_CODES_HELP,
    )
    add_version_argument(p)
    p.add_argument("--pred", required=True,
                   help="folder of predicted label maps (.nii/.nii.gz), e.g. infer.py's --output")
    p.add_argument("--labels", required=True, help="folder of reference labels: case.nii.gz for a prediction "
                   "case.nii.gz or case_0000.nii.gz, or the prediction's own name")
    p.add_argument("--classes", default="amos", help="class set (amos, amos_reference, mmwhs) or a file of names, "
                   "background first, as in training")
    p.add_argument("--label_map", help="dataset value -> class id (src:dst,... or a JSON file), applied to both "
                   "folders, as in training")
    p.add_argument("--labelled", nargs="+", metavar="CLASS",
                   help="the classes the labels label (default: the labels of a dataset.json in or above the --labels "
                   "folder, else all); the others are 'not labelled' in the tables, and predicting them is no error")
    p.add_argument("--nsd_tolerance", type=float, default=2.0, help="normalised surface Dice tolerance in mm")
    p.add_argument("--modality", default="", help="written in the tables' modality column (e.g. CT)")
    p.add_argument("--output", help="folder for the reports (default: --pred); earlier reports there are replaced")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m mulmodseg.evaluate`` and ``mulmodseg-evaluate``: score the folders ``argv`` names (default:
    the command line); returns the exit status (``mulmodseg.cli``)."""
    args = build_parser().parse_args(argv)

    def work() -> None:
        evaluate_folders(args.pred, args.labels, args.classes, args.label_map, args.nsd_tolerance, args.output,
                         args.modality, args.labelled)

    return run(work, lambda error: f"the reports in {args.output or args.pred} are written once every case is scored; "
               "run the same command again")
