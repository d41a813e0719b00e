"""Where one whole-scan inference spends its time: infer.py's path, stage by stage, then cProfile's top functions.

The stages are those of ``predict.Segmenter.segment`` and the file written after it: preprocessing (read,
RAS, resample, intensity, crop), the sliding window (network and blending), the in-place softmax, the
restoration to the scan's grid with the argmax there, and writing the label map. The checkpoint is
``--checkpoint``, or one that train.py builds for the purpose (one epoch: the weights do not change the
time) at the paper's UNet (base 32) with ``--spacing`` and ``--roi`` (the window). Each stage is timed
``--repeats`` times after one warm-up call; the median is reported with its share of the total. cProfile
then runs one more whole call and prints the functions with the most time of their own.

    python bench/profile_inference.py                          # bundled CT, UNet base 32, 3 mm, 64^3 windows
    python bench/profile_inference.py --checkpoint runs/demo/last.pt \\
        --scan data/sample/mr/imagesTr/ts_mr_001.nii.gz --modality MR
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, median, report  # noqa: E402

from mulmodseg import data as mdata  # noqa: E402
from mulmodseg.outputs import write_like  # noqa: E402
from mulmodseg.predict import InferenceSettings, Segmenter, softmax_  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def build_checkpoint(folder: Path, base: int, spacing: float, roi: int) -> Path:
    """A one-epoch train.py run on the bundled sample at these sizes; its last.pt."""
    out = folder / "run"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--ct_dir", str(SAMPLE / "ct"), "--mr_dir",
                    str(SAMPLE / "mr"), "--text", "onehot", "--base_channels", str(base), "--spacing",
                    *[str(spacing)] * 3, "--roi_size", str(roi), "--epochs", "1", "--num_workers", "0",
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out / "last.pt"


def stages(segmenter: Segmenter, scan: Path, modality: str, output: Path) -> dict[str, float]:
    """Seconds of each stage of one inference of ``scan``, in order."""
    times = {}
    t = time.perf_counter()
    image, _, meta = mdata.preprocess(scan, None, modality, **segmenter.config["preprocess"][modality])
    times["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    logits = segmenter.logits(image, modality)
    times["sliding window (network + blending)"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = softmax_(logits).cpu().numpy()
    times["softmax"] = time.perf_counter() - t
    t = time.perf_counter()
    label = mdata.restore_argmax(probs, meta)
    times["restoration + argmax"] = time.perf_counter() - t
    t = time.perf_counter()
    write_like(label, mdata.load_volume(scan), output)
    times["write label map"] = time.perf_counter() - t
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (default: build one, see above)")
    p.add_argument("--scan", default=str(SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz"))
    p.add_argument("--modality", default="CT")
    p.add_argument("--base", type=int, default=32, help="UNet base channels of the built checkpoint")
    p.add_argument("--spacing", type=float, default=3.0, help="isotropic training spacing of the built checkpoint")
    p.add_argument("--roi", type=int, default=64, help="window (training crop) side of the built checkpoint")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="infer.py's --amp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=15, help="cProfile rows")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.base, args.spacing, args.roi, args.repeats, args.no_write = 2, 6.0, 32, 1, True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = (Path(args.checkpoint) if args.checkpoint
                      else build_checkpoint(tmp, args.base, args.spacing, args.roi))
        segmenter = Segmenter(checkpoint, InferenceSettings(device="cpu", amp=args.amp))
        scan, output = Path(args.scan), tmp / "label.nii.gz"
        stages(segmenter, scan, args.modality, output)  # warm-up
        runs = [stages(segmenter, scan, args.modality, output) for _ in range(args.repeats)]
        medians = {name: median([r[name] for r in runs]) for name in runs[0]}
        total = sum(medians.values())
        rows = [[name, seconds, f"{100 * seconds / total:.1f} %"] for name, seconds in medians.items()]
        rows.append(["total", total, "100 %"])
        profiler = cProfile.Profile()
        profiler.runcall(stages, segmenter, scan, args.modality, output)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(text.getvalue())
    shape = mdata.load_volume(scan).shape
    model = segmenter.config["model"]
    built = f"built: one epoch of train.py, UNet base {args.base}, {args.spacing:g} mm, {args.roi}^3 windows"
    notes = [f"scan {scan.name} {tuple(shape)} ({args.modality}); checkpoint "
             f"{args.checkpoint or built}"
             f" ({model['backbone']}); amp {args.amp} -> {segmenter.amp_dtype or 'fp32'}, channels_last "
             f"{segmenter.channels_last}; median of {args.repeats} after one warm-up"]
    report("Whole-scan inference, stage by stage (bench/profile_inference.py)", torch.device("cpu"),
           format_table(["stage", "median s", "share"], rows), notes, write=not args.no_write)


if __name__ == "__main__":
    main()
