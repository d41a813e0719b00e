"""What keeps the held-out CHAOS MR scores below issue 26's targets (liver >= 0.88, spleen and kidneys >= 0.82).

Three measurements per CHAOS patient, the first two with the library's own preprocessing:

- **resolution**: the patient's label taken to the recipe's training grid (``preprocess``, ``--spacing``) and
  back as infer.py takes a model's scores back (one-hot scores, ``restore_argmax``): the best Dice a model
  that is right on every training-grid voxel can score;
- **contrast**: each organ's median intensity after the MR normalisation (0.5 / 99.5 percentiles -> [0, 1]),
  the values the network sees; a patient whose organs lie outside the others' range is one the training
  patients do not teach;
- **held-out Dice**: each patient's Dice per organ from ``bench/heldout.py``'s runs (``--runs``: their
  ``heldout/CHAOS_MR/metrics.csv``, the fold that held the patient out), and, per organ, what the other
  patients would have to average for the mean to reach the target while the worst patient keeps its score.

Data (``--data``, default ``../shared/data``; never copied into the project): ``chaos-mr-t2`` and ``sample/mr``
(the bundled training MR, another sequence, shown for its contrast).

    python bench/mr_limits.py --runs runs/heldout/a_fold0 runs/heldout/a_fold1
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, report  # noqa: E402

from mulmodseg.data.preprocess import preprocess, read_label, restore_argmax  # noqa: E402
from mulmodseg.metrics import dice_per_class  # noqa: E402
from mulmodseg.text.prompts import resolve_classes  # noqa: E402

CLASSES = resolve_classes("amos")
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ORGANS = ("liver", "spleen", "right kidney", "left kidney")  # what CHAOS labels
TARGETS = {"liver": 0.88, "spleen": 0.82, "right kidney": 0.82, "left kidney": 0.82}  # issue 26
SPACING = (4.5, 4.5, 4.5)  # bench/heldout.py's recipe


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding chaos-mr-t2 and sample")
    p.add_argument("--runs", nargs="*", default=["runs/heldout/a_fold0", "runs/heldout/a_fold1"],
                   help="bench/heldout.py run folders whose held-out CHAOS scores are tabulated (none: skip them)")
    p.add_argument("--spacing", type=float, nargs=3, default=SPACING, help="the training grid's spacing in mm")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    return p


def grid_and_contrast(image: Path, label: Path, spacing: tuple[float, float, float]
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """({organ: Dice of the label through the training grid and back}, {organ: median normalised intensity on
    the training grid}) for each of ``ORGANS`` the label holds."""
    data, grid_label, meta = preprocess(image, label, "MR", spacing=spacing)
    # The label on the image's voxels (a label stored in another orientation is reoriented), where restore_argmax
    # puts the scores back.
    original = read_label(nib.load(label), str(label), nib.load(image), None).astype(np.int64)
    count = int(original.max()) + 1
    back = restore_argmax(np.stack([(grid_label == k).astype(np.float32) for k in range(count)]), meta)
    dice = dice_per_class(back, original, count)
    present = [o for o in ORGANS if (grid_label == CLASSES.index(o)).any()]
    return ({o: float(dice[CLASSES.index(o) - 1]) for o in present},
            {o: float(np.median(data[grid_label == CLASSES.index(o)])) for o in present})


def held_out_dice(runs: list[Path]) -> dict[str, dict[str, float]]:
    """{case: {organ: Dice}} from each run's ``heldout/CHAOS_MR/metrics.csv`` (organs it does not label left
    out)."""
    cases: dict[str, dict[str, float]] = {}
    for run in runs:
        with (run / "heldout" / "CHAOS_MR" / "metrics.csv").open() as f:
            for row in csv.DictReader(f):
                cases[row["case"]] = {o: float(row[o]) for o in ORGANS if row.get(o) not in (None, "not labelled")}
    return cases


def others_needed(values: list[float], target: float) -> float:
    """What the other cases must average for the mean of ``values`` to reach ``target`` when the lowest keeps
    its value (above 1: out of reach)."""
    worst = min(values)
    return (target * len(values) - worst) / (len(values) - 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chaos = Path(args.data) / "chaos-mr-t2"
    if not chaos.is_dir():
        print(f"error: --data {args.data}: no chaos-mr-t2 (see the README: how to get CHAOS)", file=sys.stderr)
        return 2
    spacing = tuple(args.spacing)
    scans = [(p.name.removesuffix(".nii.gz"), p, chaos / "labelsTr" / p.name)
             for p in sorted((chaos / "imagesTr").glob("*.nii.gz"))]
    bundled = sorted((Path(args.data) / "sample" / "mr" / "imagesTr").glob("*.nii.gz"))
    scans += [(f"{p.name.removesuffix('.nii.gz')} (bundled, trained on)", p, p.parent.parent / "labelsTr" / p.name)
              for p in bundled]
    held = held_out_dice([Path(r) for r in args.runs])
    rows, columns = [], {o: [] for o in ORGANS}
    for name, image, label in scans:
        ceiling, contrast = grid_and_contrast(image, label, spacing)
        scores = held.get(name, {})
        for o in ORGANS:
            if o in scores:
                columns[o].append(scores[o])
        rows.append([name, *(f"{ceiling[o]:.3f}" if o in ceiling else "-" for o in ORGANS),
                     *(f"{contrast[o]:.2f}" if o in contrast else "-" for o in ORGANS),
                     *(f"{scores[o]:.3f}" if o in scores else "-" for o in ORGANS)])
    header = (["case"] + [f"{o}: grid ceiling" for o in ORGANS] + [f"{o}: median intensity" for o in ORGANS]
              + [f"{o}: held-out Dice" for o in ORGANS])
    text = (f"Per CHAOS patient: the Dice ceiling of a {'x'.join(f'{s:g}' for s in spacing)} mm training grid, the "
            "organs' median intensity as the network sees them, and the held-out Dice of the runs:\n\n"
            + format_table(header, rows) + "\n")
    if any(columns.values()):
        need = [[o, f"{TARGETS[o]:.2f}", f"{np.mean(v):.3f}", f"{min(v):.3f}", f"{others_needed(v, TARGETS[o]):.3f}"]
                for o, v in columns.items() if len(v) > 1]
        text += ("\nThe held-out means against issue 26's targets: what the other patients would have to average "
                 "for the mean to reach the target while the worst patient keeps its Dice:\n\n"
                 + format_table(["organ", "target", "held-out mean", "worst patient", "the others would need"], need)
                 + "\n")
    report("What limits the MR side (bench/mr_limits.py)", torch.device("cpu"), text,
           [f"runs: {', '.join(args.runs) or 'none'}", f"training grid {spacing} mm"], write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
