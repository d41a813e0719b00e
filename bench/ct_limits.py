"""What keeps a model trained on the bundled CT from segmenting other patients' CT (issue 26's CT targets).

The held-out CTs differ from the one training CT in two ways this script measures apart, with infer.py's own
path (``mulmodseg.predict.segment_files``) on checkpoints of ``bench/heldout.py``:

- **contrast phase**: the organs' Hounsfield units of every CT set (median and 10th / 90th percentiles per
  labelled organ); then each checkpoint on the training CT brightened and on the held-out CTs darkened by
  ``--shift`` HU: does a brightness offset alone turn one set into the other?
- **field of view**: ``ts-ct-slab`` is a 40 mm slab and ``msd-spleen-ct`` a 130 mm crop, where the training
  crops are cut from a whole abdomen; each checkpoint on a slab of the training CT itself, as thick as
  ``ts-ct-slab`` and centred on its spleen.

Data (``--data``, default ``../shared/data``; never copied into the project): ``sample/ct`` (the bundled
training CT), ``ts-ct-slab`` and ``msd-spleen-ct``. Derived scans are written under ``--out`` only.

    python bench/ct_limits.py --checkpoints runs/heldout/a_fold0/last.pt runs/heldout/a_fold1/last.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, report  # noqa: E402

from mulmodseg.data.geometry import ras_orientation  # noqa: E402
from mulmodseg.data.preprocess import read_label  # noqa: E402
from mulmodseg.predict import InferenceSettings, segment_files  # noqa: E402
from mulmodseg.text.prompts import resolve_classes  # noqa: E402

CLASSES = resolve_classes("amos")
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SETS = {"bundled CT (trained on)": "sample/ct", "ts-ct-slab": "ts-ct-slab", "msd-spleen-ct": "msd-spleen-ct"}
ORGANS = ("liver", "spleen")  # the two organs every CT set labels but msd-spleen-ct's liver


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints trained on the bundled CT "
                   "(bench/heldout.py's runs), one column each")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding sample, ts-ct-slab and msd-spleen-ct")
    p.add_argument("--out", default="runs/ct_limits", help="derived scans and predictions go here")
    p.add_argument("--shift", type=float, default=50.0, help="HU added to the training CT and taken from the "
                   "held-out CTs: about the organs' contrast enhancement (the HU table shows it)")
    p.add_argument("--slab_mm", type=float, default=40.0, help="thickness of the training CT's slab (ts-ct-slab's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    return p


def pair(folder: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The one image of a dataset folder and its label on the image's voxels."""
    image_path = sorted((folder / "imagesTr").glob("*.nii.gz"))[0]
    image = nib.load(image_path)
    label = read_label(nib.load(folder / "labelsTr" / image_path.name), str(image_path), image, None)
    return image, label


def organ_hu(image: nib.Nifti1Image, label: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """{organ: (median, 10th, 90th percentile HU)} of every organ the label has voxels of."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    return {CLASSES[c]: tuple(float(np.percentile(data[label == c], q)) for q in (50, 10, 90))
            for c in np.unique(label) if c > 0}


def slab(image: nib.Nifti1Image, label: np.ndarray, organ: str, thickness_mm: float
         ) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The slab of ``thickness_mm`` along the scan's superior/inferior voxel axis centred on ``organ``'s extent
    (affine moved with it, so it lies where it lay)."""
    axis = int(np.flatnonzero(ras_orientation(image.affine)[:, 0] == 2)[0])
    others = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero((label == CLASSES.index(organ)).any(axis=others))
    count = max(1, round(thickness_mm / float(image.header.get_zooms()[axis])))
    start = int(np.clip((present[0] + present[-1] + 1 - count) // 2, 0, label.shape[axis] - count))
    index = [slice(None)] * 3
    index[axis] = slice(start, start + count)
    return image.slicer[tuple(index)], label[tuple(index)]


def shifted(image: nib.Nifti1Image, hu: float) -> nib.Nifti1Image:
    """``image`` with ``hu`` added to every voxel (float32), same geometry."""
    return nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32) + np.float32(hu), image.affine)


def write_case(folder: Path, image: nib.Nifti1Image, label: np.ndarray, source: Path) -> Path:
    """``folder`` as a one-case dataset (imagesTr, labelsTr; the label on the image's grid) labelling what the
    dataset ``source`` labels (its dataset.json, or its parent's)."""
    description = next(d / "dataset.json" for d in (source, source.parent) if (d / "dataset.json").is_file())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(description.read_text())
    for sub, img in (("imagesTr", image), ("labelsTr", nib.Nifti1Image(label.astype(np.uint8), image.affine))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(img, folder / sub / "case.nii.gz")
    return folder


def conditions(data: Path, out: Path, shift: float, slab_mm: float) -> dict[str, Path]:
    """{row name: one-case dataset folder}: each CT set as it is, then its derived scans."""
    rows = {}
    for name, sub in SETS.items():
        source, stem = data / sub, out / "scans" / sub.replace("/", "_")
        image, label = pair(source)
        rows[name] = write_case(stem, image, label, source)
        sign = 1.0 if name.startswith("bundled") else -1.0
        rows[f"{name}, {sign * shift:+g} HU"] = write_case(Path(f"{stem}_shift"), shifted(image, sign * shift),
                                                           label, source)
        if name.startswith("bundled"):
            rows[f"{name}, {slab_mm:g} mm slab on the spleen"] = write_case(
                Path(f"{stem}_slab"), *slab(image, label, "spleen", slab_mm), source)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    missing = [s for s in SETS.values() if not (data / s).is_dir()]
    if missing:
        print(f"error: --data {data}: no {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    hu_rows = []
    for name, sub in SETS.items():
        for organ, (med, low, high) in organ_hu(*pair(data / sub)).items():
            hu_rows.append([name, organ, f"{med:.0f}", f"{low:.0f} .. {high:.0f}"])
    dice_rows = []
    for name, folder in conditions(data, out, args.shift, args.slab_mm).items():
        cells = []
        for k, checkpoint in enumerate(args.checkpoints):
            record = segment_files(checkpoint, sorted((folder / "imagesTr").glob("*.nii.gz")), out / "pred" / str(k)
                                   / folder.name, "CT", InferenceSettings(), overwrite=True,
                                   labels_dir=folder / "labelsTr", log=lambda m: None)[0]
            cells += [record["dice"][CLASSES.index(o) - 1] for o in ORGANS]
        dice_rows.append([name, *("-" if np.isnan(v) else f"{v:.3f}" for v in cells)])
    # A checkpoint is named by its run folder and the folder above (runs of two bench/heldout.py --out side by side).
    header = ["CT scan"] + [f"{o} ({'/'.join(Path(c).parts[-3:-1])})" for c in args.checkpoints for o in ORGANS]
    text = ("Hounsfield units of the labelled organs:\n\n"
            + format_table(["CT set", "organ", "median HU", "10th .. 90th percentile"], hu_rows)
            + "\n\nDice of infer.py's path (- : not labelled):\n\n" + format_table(header, dice_rows) + "\n")
    report("What limits the CT side (bench/ct_limits.py)", torch.device("cpu"), text,
           [f"checkpoints: {', '.join(args.checkpoints)}", f"shift {args.shift:g} HU, slab {args.slab_mm:g} mm"],
           write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
