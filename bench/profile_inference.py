"""Where one whole-scan inference spends its time: infer.py's path, stage by stage, then cProfile's top functions.

The stages are those of ``predict.Segmenter.segment`` and the file written after it: preprocessing (read,
RAS, resample, intensity, crop), the sliding window (network and blending), the in-place softmax, the
restoration to the scan's grid with the argmax there, and writing the label map; beside each, the process's
peak resident memory so far. The checkpoint is ``--checkpoint``, or one built for the purpose by
``training.Trainer.prepare`` (its initial weights: they do not change the time) with ``--backbone``,
``--base`` / ``--feature_size``, ``--spacing`` and ``--roi`` (the window). Each stage is timed ``--repeats``
times after ``--warmup`` calls; the median is reported with its share of the total. ``--peer`` also times
MONAI's ``sliding_window_inference`` with the same network (same weights, fp32, contiguous layout, the same
overlap and windows per call) on the same preprocessed image. cProfile then runs one more whole call and prints
the functions with the most time of their own (``--rows 0``: none).

``--real_size`` is a user's abdominal CT: a 512 x 512 x 300 scan at 0.8 x 0.8 x 1.5 mm (the bundled CT resampled
onto that grid, so the body fills the field of view as in a clinical scan) with the paper's settings (1.5 x 1.5 x
2 mm, 96^3 windows, overlap 0.5; UNet base 32 or SwinUNETR feature size 48), one timed run, no cProfile.

    python bench/profile_inference.py                          # bundled CT, UNet base 32, 3 mm, 64^3 windows
    python bench/profile_inference.py --checkpoint runs/demo/last.pt \\
        --scan data/sample/mr/imagesTr/ts_mr_001.nii.gz --modality MR
    python bench/profile_inference.py --real_size --peer       # a 512 x 512 x 300 CT, ours against MONAI's
    python bench/profile_inference.py --real_size --peer --backbone swinunetr --overlap 0.25
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, median, report  # noqa: E402

from mulmodseg import data as mdata  # noqa: E402
from mulmodseg.config import TrainConfig  # noqa: E402
from mulmodseg.outputs import write_like  # noqa: E402
from mulmodseg.predict import InferenceSettings, Segmenter, softmax_  # noqa: E402
from mulmodseg.training import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
# A clinical abdominal CT's grid (voxels, mm) and the paper's inference settings for it.
REAL_SHAPE, REAL_SPACING = (512, 512, 300), (0.8, 0.8, 1.5)
PAPER = {"spacing": [1.5, 1.5, 2.0], "roi": 96, "base": 32, "feature_size": 48}


def build_checkpoint(folder: Path, backbone: str, size: int, spacing: list[float], roi: int) -> Path:
    """A checkpoint of a run on the bundled sample at these sizes, at its initial weights (no step is trained:
    the time of inference does not depend on the weights); ``size``: UNet base channels or Swin feature size."""
    width = {"feature_size": size} if backbone == "swinunetr" else {"base_channels": size}
    config = TrainConfig(data_dirs={"CT": [str(SAMPLE / "ct")], "MR": [str(SAMPLE / "mr")]}, out=str(folder / "run"),
                         backbone=backbone, text="onehot", spacing=tuple(spacing), roi_size=(roi,) * 3, epochs=1,
                         num_workers=0, device="cpu", **width)
    trainer = Trainer(config, log=lambda msg: None)
    try:
        trainer.prepare()
        trainer.save(trainer.out / "last.pt", 0)
    finally:
        trainer.close()
    return trainer.out / "last.pt"


def real_size_ct(path: Path, shape: tuple[int, ...] = REAL_SHAPE, spacing: tuple[float, ...] = REAL_SPACING) -> Path:
    """The bundled CT resampled (linearly) onto a ``shape`` grid of ``spacing`` mm voxels, written to ``path`` as
    int16 HU with the bundled scan's axis directions."""
    source = mdata.load_volume(SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz")
    data = source.get_fdata(dtype=np.float32)
    resampled = ndimage.zoom(data, [n / s for n, s in zip(shape, data.shape)], order=1)
    directions = source.affine[:3, :3] / nib.affines.voxel_sizes(source.affine)
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spacing)
    affine[:3, 3] = source.affine[:3, 3]
    nib.save(nib.Nifti1Image(np.round(resampled).astype(np.int16), affine), path)
    return path


def peak_memory_mb() -> float:
    """The process's peak resident memory so far, MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stages(segmenter: Segmenter, scan: Path, modality: str, output: Path
           ) -> tuple[dict[str, tuple[float, float]], np.ndarray]:
    """(seconds, peak memory MB so far) of each stage of one inference of ``scan``, in order, and the preprocessed
    image."""
    times = {}

    def done(name: str, start: float) -> None:
        synchronize(segmenter.device)
        times[name] = (time.perf_counter() - start, peak_memory_mb())

    t = time.perf_counter()
    image, _, meta = mdata.preprocess(scan, None, modality, **segmenter.config["preprocess"][modality])
    done("preprocess", t)
    t = time.perf_counter()
    logits = segmenter.logits(image, modality)
    done("sliding window (network + blending)", t)
    t = time.perf_counter()
    probs = softmax_(logits).cpu().numpy()
    done("softmax", t)
    t = time.perf_counter()
    label = mdata.restore_argmax(probs, meta)
    done("restoration + argmax", t)
    t = time.perf_counter()
    write_like(label, mdata.load_volume(scan), output)
    done("write label map", t)
    return times, image


def monai_seconds(segmenter: Segmenter, image: np.ndarray, modality: str) -> float:
    """Seconds of MONAI's sliding window over the preprocessed ``image`` with the segmenter's network (its
    weights, fp32, contiguous), overlap and windows per call, Gaussian blending, the output on the network's
    device as MONAI does by default."""
    from monai.inferers import sliding_window_inference as monai_swi

    model = copy.deepcopy(segmenter.model).to(memory_format=torch.contiguous_format).float()
    x = torch.as_tensor(image, dtype=torch.float32)[None, None].to(segmenter.device)
    s = segmenter.settings
    t = time.perf_counter()
    with torch.no_grad():
        monai_swi(x, segmenter.roi_size, s.sw_batch_size, partial(model, modality=modality), overlap=s.overlap,
                  mode="gaussian")
    synchronize(segmenter.device)
    return time.perf_counter() - t


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (default: build one, see above)")
    p.add_argument("--scan", default=str(SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz"))
    p.add_argument("--modality", default="CT")
    p.add_argument("--real_size", action="store_true", help="a 512 x 512 x 300 CT at the paper's settings (see above)")
    p.add_argument("--backbone", default="unet", choices=["unet", "swinunetr"], help="of the built checkpoint")
    p.add_argument("--base", type=int, default=32, help="UNet base channels of the built checkpoint")
    p.add_argument("--feature_size", type=int, default=48, help="SwinUNETR feature size of the built checkpoint")
    p.add_argument("--spacing", type=float, nargs="+", default=[3.0],
                   help="training spacing of the built checkpoint, mm (one value: isotropic)")
    p.add_argument("--roi", type=int, default=64, help="window (training crop) side of the built checkpoint")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="infer.py's --amp")
    p.add_argument("--overlap", type=float, default=InferenceSettings.overlap, help="infer.py's --overlap")
    p.add_argument("--device", default="cpu", help="infer.py's --device")
    p.add_argument("--peer", action="store_true", help="also time MONAI's sliding window with the same network")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rows", type=int, default=15, help="cProfile rows (0: no cProfile run)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real_size:
        args.spacing, args.roi, args.base, args.feature_size = PAPER["spacing"], PAPER["roi"], PAPER["base"], \
            PAPER["feature_size"]
        args.modality, args.repeats, args.warmup, args.rows = "CT", 1, 0, 0
    if args.quick:
        args.base, args.feature_size, args.spacing, args.roi = 2, 12, [6.0], 32
        args.repeats, args.warmup, args.no_write = 1, 0, True
    spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
    size = args.feature_size if args.backbone == "swinunetr" else args.base
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = (Path(args.checkpoint) if args.checkpoint
                      else build_checkpoint(tmp, args.backbone, size, spacing, args.roi))
        segmenter = Segmenter(checkpoint, InferenceSettings(device=args.device, amp=args.amp, overlap=args.overlap))
        scan = real_size_ct(tmp / "ct.nii.gz", REAL_SHAPE if not args.quick else (96, 96, 60)) if args.real_size \
            else Path(args.scan)
        output = tmp / "label.nii.gz"
        for _ in range(args.warmup):
            stages(segmenter, scan, args.modality, output)
        runs, images = zip(*(stages(segmenter, scan, args.modality, output) for _ in range(args.repeats)))
        peer = monai_seconds(segmenter, images[-1], args.modality) if args.peer else None
        grid = images[-1].shape
        del images  # a whole scan each: not held through cProfile's run
        profiler = None
        if args.rows:
            profiler = cProfile.Profile()
            profiler.runcall(stages, segmenter, scan, args.modality, output)
        shape = mdata.load_volume(scan).shape
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.rows)
        print(text.getvalue())
    medians = {name: median([r[name][0] for r in runs]) for name in runs[0]}
    total = sum(medians.values())
    rows = [[name, seconds, f"{100 * seconds / total:.1f} %", f"{runs[-1][name][1]:.0f}"]
            for name, seconds in medians.items()]
    rows.append(["total", total, "100 %", f"{max(r[name][1] for r in runs for name in r):.0f}"])
    window = medians["sliding window (network + blending)"]
    if peer is not None:
        rows.append(["MONAI sliding window, fp32, same network", peer, "-", "-"])
        rows.append(["whole scan with MONAI's sliding window", total - window + peer, "-", "-"])
    model = segmenter.config["model"]
    built = (f"built: initial weights, {args.backbone} {'feature size' if args.backbone == 'swinunetr' else 'base'} "
             f"{size}, {' x '.join(f'{s:g}' for s in spacing)} mm, {args.roi}^3 windows")
    what = f"a {' x '.join(map(str, shape))} CT at {' x '.join(map(str, REAL_SPACING))} mm (the bundled CT resampled)" \
        if args.real_size else f"scan {scan.name} {tuple(shape)} ({args.modality})"
    notes = [f"{what}, {' x '.join(map(str, grid))} voxels after preprocessing; checkpoint "
             f"{args.checkpoint or built} ({model['backbone']}); device {segmenter.device}, amp {args.amp} -> "
             f"{segmenter.amp_dtype or 'fp32'}, channels_last {segmenter.channels_last}, overlap {args.overlap:g}, "
             f"{segmenter.settings.sw_batch_size} windows per call; median of {args.repeats} after {args.warmup} "
             "warm-up; peak MB: the process's peak resident memory at the end of the stage"]
    if peer is not None:
        notes.append(f"ours against MONAI's sliding window (fp32, same network and weights, same image): "
                     f"{peer / window:.2f}x on the sliding window, {(total - window + peer) / total:.2f}x on the "
                     "whole scan (the other stages are ours in both)")
    report("Whole-scan inference, stage by stage (bench/profile_inference.py)", segmenter.device,
           format_table(["stage", "median s", "share", "peak MB"], rows), notes, write=not args.no_write)


if __name__ == "__main__":
    main()
