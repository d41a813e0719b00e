"""Data pipeline speed: preprocessing per scan and cached crop throughput per worker.

1. ``preprocess`` (read NIfTI, RAS, resample to 1.5 x 1.5 x 2 mm, intensity, foreground crop, pad) on
   the bundled sample scans (data/sample, one CT and one MR) and on a synthetic full-size CT
   (512 x 512 x 300, 0.78 x 0.78 x 1.5 mm, a body-like ellipse with organ blobs, written as .nii.gz
   first so reading and decompression are timed), interleaved with the same work done by the MONAI
   transform chain the reference uses (LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd
   bilinear/nearest, intensity window or percentiles, CropForegroundd).
2. Crops per second of one worker (one process, as each DataLoader worker is) drawing
   ``CropDataset`` items (2 crops of 96^3 each) from ``VolumeCache`` memory maps, with the default
   intensity augmentation and with the spatial warp on. A training step takes seconds per 2 crops,
   so one worker at tens of crops/s keeps a GPU fed.
3. The spatial warp of one 96^3 crop (rotation about S/I + per-axis scale; image linear, label nearest,
   reflected borders): our ``warp`` vs MONAI's ``Affine`` (what the reference's RandAffined runs),
   interleaved.

Crop and warp timings run with one torch thread, as in a DataLoader worker.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, format_table, interleaved, median, report, setup  # noqa: E402

from mulmodseg.data.cache import VolumeCache  # noqa: E402
from mulmodseg.data.cases import Case, discover_modalities  # noqa: E402
from mulmodseg.data.preprocess import default_settings, preprocess  # noqa: E402
from mulmodseg.data.sampling import CropDataset, warp  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def synthetic_ct(folder: Path, shape, spacing) -> Case:
    """A body-like CT (air -1000 HU, soft tissue 40 HU ellipse, brighter blobs labelled 1..13) as .nii.gz."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    image = np.full(shape, -1000, np.int16)
    image[body] = 40
    label = np.zeros(shape, np.uint8)
    for k in range(1, 14):
        c = rng.integers([shape[0] // 4, shape[1] // 4, shape[2] // 4], [3 * shape[0] // 4, 3 * shape[1] // 4,
                                                                          3 * shape[2] // 4])
        r = np.array(shape) // 16
        box = tuple(slice(a - b, a + b) for a, b in zip(c, r))
        label[box] = k
        image[box] = 40 + 10 * k
    image += rng.integers(-20, 20, shape, dtype=np.int16)
    affine = np.diag(list(spacing) + [1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "synth_ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "synth_ct_label.nii.gz")
    return Case("synth_ct", folder / "synth_ct.nii.gz", folder / "synth_ct_label.nii.gz", "CT")


def monai_preprocess(case: Case, settings: dict):
    """The reference's MONAI chain doing our preprocessing's work on ``case``: a closure returning the image."""
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, ScaleIntensityRangePercentilesd, Spacingd)

    keys = ["image", "label"]
    if settings["window"]:
        low, high = settings["window"]
        intensity = ScaleIntensityRanged("image", low, high, 0.0, 1.0, clip=True)
    else:
        low, high = settings["percentiles"]
        intensity = ScaleIntensityRangePercentilesd("image", low, high, 0.0, 1.0, clip=True)
    chain = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
                     Spacingd(keys, pixdim=settings["spacing"], mode=("bilinear", "nearest")), intensity,
                     CropForegroundd(keys, source_key="image")])
    return lambda: chain({"image": str(case.image), "label": str(case.label)})["image"]


def crops_per_second(volumes, roi: int, items: int, **aug) -> float:
    dataset = CropDataset(volumes, roi_size=(roi,) * 3, num_samples=2, seed=0, **aug)
    dataset[0]  # touch the memory maps once
    start = time.perf_counter()
    crops = 0
    for i in range(items):
        dataset.set_epoch(i)
        crops += dataset[i % len(dataset)]["image"].shape[0]
    return crops / (time.perf_counter() - start)


def warp_contenders(roi: int):
    """Closures warping one random roi^3 crop (image + label) by the same rotation and scales."""
    from monai.transforms import Affine

    rng = np.random.default_rng(0)
    image = rng.random((roi,) * 3).astype(np.float32)
    label = rng.integers(0, 14, (roi,) * 3)
    angle, scales = np.deg2rad(6.0), (1.05, 0.95, 1.1)
    affine = Affine(rotate_params=(0.0, 0.0, angle), scale_params=scales, padding_mode="reflection",
                    image_only=True)
    img_t, lab_t = torch.from_numpy(image)[None], torch.from_numpy(label)[None]

    def monai_warp():
        return affine(img_t, mode="bilinear"), affine(lab_t, mode="nearest")

    return {"ours warp": lambda: warp(image, label, angle, scales), "MONAI Affine": monai_warp}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--synthetic-shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--synthetic-spacing", type=float, nargs=3, default=(0.78, 0.78, 1.5))
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--items", type=int, default=20, help="dataset items (2 crops each) timed per setting")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.synthetic_shape, args.items = (128, 128, 60), 2
    rows = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [c for cs in discover_modalities(SAMPLE).values() for c in cs]
        cases.append(synthetic_ct(tmp, tuple(args.synthetic_shape), tuple(args.synthetic_spacing)))
        for case in cases:
            settings = default_settings(case.modality)
            shape_in = nib.load(case.image).shape
            shape = preprocess(case.image, case.label, case.modality, **settings)[0].shape
            times = interleaved({"ours": lambda: preprocess(case.image, case.label, case.modality, **settings),
                                 "MONAI": monai_preprocess(case, settings)}, args.repeats, args.warmup, device)
            for name, t in times.items():
                rows.append([f"preprocess, {name}", f"{case.id} ({case.modality}) {shape_in} -> {tuple(shape)}",
                             median(t), min(t), max(t), f"{median(times['MONAI']) / median(t):.2f}x MONAI"])
        cache = VolumeCache(tmp / "cache")
        volumes = []
        for case in cases:
            image, label, _ = cache.load(case, default_settings(case.modality))
            volumes.append((image, label))
        torch.set_num_threads(1)
        for name, aug in [("intensity aug (default)", {}),
                          ("+ warp (rotate 6 deg, scale 0.1)", {"rotate_degrees": 6.0, "scale_range": 0.1})]:
            rate = crops_per_second(volumes, args.roi, args.items, **aug)
            rows.append(["crops from VolumeCache, 1 worker", f"{args.roi}^3, {name}", 1 / rate, "", "",
                         f"{rate:.1f} crops/s"])
        times = interleaved(warp_contenders(args.roi), args.repeats, args.warmup, device)
        peer = median(times["MONAI Affine"])
        for name, t in times.items():
            rows.append(["warp one crop, 1 thread", f"{args.roi}^3 {name}", median(t), min(t), max(t),
                         f"{peer / median(t):.2f}x MONAI"])
        torch.set_num_threads(threads)
    table = format_table(["stage", "case / setting", "median s (per scan or crop)", "min", "max", "throughput"],
                         rows)
    notes = [f"preprocess: {args.repeats} runs per scan, default settings (1.5 x 1.5 x 2 mm, CT window, fg crop, "
             f"pad to 96^3); synthetic CT {tuple(args.synthetic_shape)} at {tuple(args.synthetic_spacing)} mm, int16 "
             f".nii.gz; crops: {args.items} items x 2 crops over the {len(volumes)} cached volumes, in this process"]
    report("Data pipeline", device, table, notes, write=not args.no_write)


if __name__ == "__main__":
    main()
