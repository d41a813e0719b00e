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
4. nnU-Net's default augmentation (``mulmodseg.augment``, ``--augment nnunet``) of batches of crops cut
   at ``augment.input_size`` and returned at 64^3 and 96^3: ours batched (``augment_batch``, label nearest
   and one-hot linear) against the same transforms applied per crop by MONAI's chain (RandAffined,
   RandFlipd, RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd, RandScaleIntensityFixedMeand,
   RandSimulateLowResolutiond, RandAdjustContrastd, with nnU-Net's probabilities) and, when it imports,
   by batchgeneratorsv2 composed as nnU-Net's ``get_training_transforms`` (nnU-Net's own code path), all
   with the process's torch threads, interleaved.

Crop and warp timings run with one torch thread, as in a DataLoader worker. ``--sections`` picks parts.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, format_table, interleaved, median, report, setup  # noqa: E402

from mulmodseg.augment import NnUNetAugment, augment_batch, draw_params, input_size  # noqa: E402
from mulmodseg.data.cache import VolumeCache  # noqa: E402
from mulmodseg.data.cases import Case, discover_modalities  # noqa: E402
from mulmodseg.data.preprocess import default_settings, preprocess  # noqa: E402
from mulmodseg.data.sampling import CropDataset, warp  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
SECTIONS = ("preprocess", "crops", "warp", "augment")


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
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

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


def augmentation_crops(out: int, batch: int, classes: int = 14, seed: int = 0):
    """`batch` crops of `augment.input_size` around out^3 with nnU-Net's settings: a smooth image in [0, 1]
    (noise upsampled from 1/8 resolution) and a uint8 label (VolumeCache's dtype) of `classes` classes cut
    from it by value."""
    size = input_size((out,) * 3, NnUNetAugment())
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((batch, 1, *[s // 8 + 2 for s in size]), generator=g)
    image = torch.nn.functional.interpolate(coarse, size, mode="trilinear", align_corners=False)
    image = (image - image.amin()) / (image.amax() - image.amin())
    label = (image * classes).clamp(max=classes - 1).to(torch.uint8)
    return image.contiguous(), label.contiguous()


def monai_nnunet_chain(out: int):
    """MONAI's transforms set up as nnU-Net's defaults (the closest MONAI has), applied per crop."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandScaleIntensityFixedMeand,
        RandSimulateLowResolutiond,
    )

    both, img = ["image", "label"], ["image"]
    chain = Compose([
        # rotation p 0.2 and scaling p 0.2 independently = one resampling in 1 - 0.8 * 0.8 = 36 % of crops
        RandAffined(both, spatial_size=(out,) * 3, prob=0.36, rotate_range=(math.pi / 6,) * 3,
                    scale_range=((-0.3, 0.4),) * 3, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised(img, prob=0.1, mean=0.0, std=0.1, sample_std=True),
        RandGaussianSmoothd(img, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1),
        RandScaleIntensityd(img, factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand(img, factors=0.25, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond(img, prob=0.125, zoom_range=(0.5, 1.0)),
        RandAdjustContrastd(img, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrastd(img, prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        RandFlipd(both, prob=0.5, spatial_axis=0), RandFlipd(both, prob=0.5, spatial_axis=1),
        RandFlipd(both, prob=0.5, spatial_axis=2),
    ])
    chain.set_random_state(seed=0)
    return chain


def batchgeneratorsv2_chain(out: int):
    """nnU-Net v2's training transforms for a 3D isotropic patch, built from batchgeneratorsv2 as
    nnUNetTrainer.get_training_transforms builds them (without deep-supervision targets); None when the
    package does not import (it is not a dependency: `pip install batchgeneratorsv2`)."""
    try:
        from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
        from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
        from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
        from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
        from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
        from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
        from batchgeneratorsv2.transforms.utils.random import RandomTransform
    except ImportError:
        return None
    rotation = (-math.pi / 6, math.pi / 6)
    return ComposeTransforms([
        SpatialTransform((out,) * 3, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=rotation, p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])


def augmentation_contenders(out: int, batch: int, crops: int, notes: list):
    """Closures augmenting `crops` crops (batches of `batch`) to out^3 each. Every round does the same work:
    ours the same keys, the peers reseeded, so rounds differ only by the machine's noise."""
    import numpy as np

    image, label = augmentation_crops(out, batch)
    settings = NnUNetAugment()
    keys = [[(0, j, i) for i in range(batch)] for j in range(crops // batch)]

    def ours(mode: str):
        s = settings.with_overrides({"label_mode": mode})

        def run():
            for k in keys:
                augment_batch(image, label, k, s, (out,) * 3)
        return run

    def per_crop(chain, wrap, reseed, keywords: bool = False):
        def run():
            reseed()
            for j in range(crops):
                data = wrap(image[j % batch], label[j % batch])
                chain(**data) if keywords else chain(data)
        return run

    def reseed_global():  # batchgeneratorsv2 draws from numpy's and torch's global generators
        np.random.seed(0)
        torch.manual_seed(0)

    monai = monai_nnunet_chain(out)
    fns = {"ours batched, label nearest": ours("nearest"), "ours batched, label one-hot linear": ours("linear"),
           "MONAI chain per crop": per_crop(monai, lambda img, lab: {"image": img.clone(), "label": lab.clone()},
                                            lambda: monai.set_random_state(seed=0))}
    bg = batchgeneratorsv2_chain(out)
    if bg is not None:
        fns["batchgeneratorsv2 (nnU-Net) per crop"] = per_crop(
            bg, lambda img, lab: {"image": img.clone(), "segmentation": lab.to(torch.int16)}, reseed_global,
            keywords=True)
    else:
        notes.append("batchgeneratorsv2 not importable here (not a dependency; `pip install batchgeneratorsv2` "
                     "in a separate environment): left out")
    warped = sum(int(draw_params(k, settings).spatial.sum()) for k in keys)
    notes.append(f"{out}^3: ours warps {warped} of its {len(keys) * batch} crops (nnU-Net's rate: 36 %)")
    return fns, tuple(image.shape[2:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--synthetic-shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--synthetic-spacing", type=float, nargs=3, default=(0.78, 0.78, 1.5))
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--items", type=int, default=20, help="dataset items (2 crops each) timed per setting")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which parts to run (default: all)")
    parser.add_argument("--augment-sizes", type=int, nargs="+", default=(64, 96), help="output crop sizes (cubes)")
    parser.add_argument("--augment-batch", type=int, default=4, help="crops per augment_batch call")
    parser.add_argument("--augment-crops", type=int, nargs="+", default=(16,),
                        help="crops per timed round and contender, one number per size (the last repeats)")
    parser.add_argument("--augment-linear-sizes", type=int, nargs="*", default=(64,),
                        help="sizes at which to also time the one-hot linear label (slow on the CPU)")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.synthetic_shape, args.items = (128, 128, 60), 2
        args.augment_sizes, args.augment_crops, args.augment_linear_sizes = (16,), (args.augment_batch,), (16,)
    rows: list = []
    notes: list = []
    if {"preprocess", "crops", "warp"} & set(args.sections):
        pipeline_rows(args, device, rows, notes)
    if rows:
        table = format_table(["stage", "case / setting", "median s (per scan or crop)", "min", "max", "throughput"],
                             rows)
        report("Data pipeline", device, table, notes, write=not args.no_write)
    if "augment" in args.sections:
        augment_report(args, device)


def machine_load() -> str:
    """The CPU's bf16/AMX support and the load average when the section ran: the machine is shared, so
    compare the ratios of one run, not absolute times across runs."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    has = {name: name in flags.split() for name in ("avx512_bf16", "amx_bf16")}
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return (f"CPU flags (/proc/cpuinfo): AVX512-BF16 {'yes' if has['avx512_bf16'] else 'no'}, AMX "
            f"{'yes' if has['amx_bf16'] else 'no'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} cores: other work shared the "
            "machine, so the ratios count, not the absolute times")


def augment_report(args, device) -> None:
    """Section 4: crops per second of nnU-Net's augmentation, ours batched against per-crop peers."""
    rows, notes = [], []
    for k, out in enumerate(args.augment_sizes):
        crops = args.augment_crops[min(k, len(args.augment_crops) - 1)]
        fns, in_size = augmentation_contenders(out, args.augment_batch, crops, notes)
        if out not in args.augment_linear_sizes:
            del fns["ours batched, label one-hot linear"]
        times = interleaved(fns, args.repeats, args.warmup, device)
        peer = times["MONAI chain per crop"]
        for name, t in times.items():
            per_crop = median(t) / crops
            paired = [p / s for p, s in zip(peer, t)]  # the same round's MONAI time over this one's
            rows.append([f"{out}^3 from {in_size[0]}x{in_size[1]}x{in_size[2]}, {crops} crops", name, per_crop,
                         min(t) / crops, max(t) / crops, f"{1 / per_crop:.1f}", f"{median(peer) / median(t):.2f}x",
                         f"{median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})"])
    table = format_table(["crop", "contender", "median s per crop", "min", "max", "crops per second",
                          "vs MONAI (ratio of medians)", "vs MONAI per round (median, range)"], rows)
    notes = [(f"nnU-Net's default settings (mulmodseg.augment.NnUNetAugment()); ours in batches of "
              f"{args.augment_batch}, peers one crop at a time, the same draws every round; input crops cut at "
              f"augment.input_size (every rotation covered), a smooth random image and 14 label classes; "
              f"{args.repeats} interleaved rounds after {args.warmup} warm-up; torch threads "
              f"{torch.get_num_threads()}"),
             ("MONAI's RandAffined with spatial_size resamples every crop (an identity grid when it draws no "
              "transform) and draws scales per axis; ours slices the crops that draw no spatial transform"),
             *dict.fromkeys(notes), machine_load()]
    report("nnU-Net augmentation, batched (mulmodseg.augment) vs per crop", device, table, notes,
           write=not args.no_write)


def pipeline_rows(args, device, rows: list, notes: list) -> None:
    """Sections 1-3: preprocessing per scan, crops per second of one worker, the warp of one crop."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [c for cs in discover_modalities(SAMPLE).values() for c in cs]
        cases.append(synthetic_ct(tmp, tuple(args.synthetic_shape), tuple(args.synthetic_spacing)))
        if "preprocess" in args.sections:
            for case in cases:
                settings = default_settings(case.modality)
                shape_in = nib.load(case.image).shape
                shape = preprocess(case.image, case.label, case.modality, **settings)[0].shape
                times = interleaved({"ours": lambda: preprocess(case.image, case.label, case.modality, **settings),
                                     "MONAI": monai_preprocess(case, settings)}, args.repeats, args.warmup, device)
                for name, t in times.items():
                    rows.append([f"preprocess, {name}", f"{case.id} ({case.modality}) {shape_in} -> {tuple(shape)}",
                                 median(t), min(t), max(t), f"{median(times['MONAI']) / median(t):.2f}x MONAI"])
        torch.set_num_threads(1)
        if "crops" in args.sections:
            cache = VolumeCache(tmp / "cache")
            volumes = []
            for case in cases:
                image, label, _ = cache.load(case, default_settings(case.modality))
                volumes.append((image, label))
            for name, aug in [("intensity aug (default)", {}),
                              ("+ warp (rotate 6 deg, scale 0.1)", {"rotate_degrees": 6.0, "scale_range": 0.1})]:
                rate = crops_per_second(volumes, args.roi, args.items, **aug)
                rows.append(["crops from VolumeCache, 1 worker", f"{args.roi}^3, {name}", 1 / rate, "", "",
                             f"{rate:.1f} crops/s"])
        if "warp" in args.sections:
            times = interleaved(warp_contenders(args.roi), args.repeats, args.warmup, device)
            peer = median(times["MONAI Affine"])
            for name, t in times.items():
                rows.append(["warp one crop, 1 thread", f"{args.roi}^3 {name}", median(t), min(t), max(t),
                             f"{peer / median(t):.2f}x MONAI"])
        torch.set_num_threads(threads)
    notes.append(f"preprocess: {args.repeats} runs per scan, default settings (1.5 x 1.5 x 2 mm, CT window, fg crop, "
                 f"pad to 96^3); synthetic CT {tuple(args.synthetic_shape)} at {tuple(args.synthetic_spacing)} mm, "
                 f"int16 .nii.gz; crops: {args.items} items x 2 crops over the {len(cases)} cached volumes, in this "
                 "process")


if __name__ == "__main__":
    main()
