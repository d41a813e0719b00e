"""Peak memory: GPU memory of a training step, host memory of whole-scan inference with CPU accumulation.

GPU (only when a CUDA device is present): ``torch.cuda.max_memory_allocated`` over two training steps
(fwd + bwd + AdamW) at 96^3, batch 2, fp32 and bf16 autocast, for our models and the peers.

Host: peak resident set size (``ru_maxrss``) of a fresh subprocess that builds the network and runs
sliding-window inference (96^3 windows, overlap 0.5, gaussian, sw_batch_size 4, output accumulated on
the CPU) over a 512 x 512 x 600 CT resampled to the training grid (0.78 x 0.78 x 1.0 mm -> 1.5 x 1.5 x 2
mm: 266 x 266 x 300). To keep CPU runs short the predictor stops the run after ``--windows`` batches:
the output and weight accumulators are allocated at the first batch and every later batch repeats the
same allocations, so the peak is reached by then. The same is done for MONAI's inferer with the peer.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, format_table, report, setup  # noqa: E402


class Stop(Exception):
    """Raised by the counting predictor to end a run early."""


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    """Run one inference in this (fresh) process; return peak RSS after building and after inferring."""
    from peers import MODALITIES, monai_merge_order, monai_swinunetr
    from reference_head import MonaiSwinFeatures, ReferenceHeadModel

    from mulmodseg.inferer import sliding_window_inference
    from mulmodseg.model import MulModSeg

    torch.set_grad_enabled(False)
    # Only the one network is built: ru_maxrss is a high-water mark, so a second one would count.
    table = torch.randn(len(MODALITIES), 14, 512)
    if spec["backbone"] == "swin":
        kwargs = dict(feature_size=spec["feature_size"], merge_order=monai_merge_order())
        if spec["ours"]:
            model = MulModSeg("swinunetr", 14, embeddings=table, modalities=MODALITIES, **kwargs)
        else:
            net = monai_swinunetr(spec["feature_size"], 14, spec["roi"])
            model = ReferenceHeadModel(MonaiSwinFeatures(net), table, MODALITIES)
    else:
        model = MulModSeg("unet", 14, embeddings=table, modalities=MODALITIES, base_channels=spec["unet_base"])
        if not spec["ours"]:
            model = ReferenceHeadModel(model.backbone, table, MODALITIES)
    model.eval()
    volume = torch.rand(1, 1, *spec["shape"])
    built = maxrss_mib()
    calls = {"n": 0}

    def predictor(x):
        calls["n"] += 1
        if calls["n"] > spec["windows"]:
            raise Stop
        return model(x, "CT")

    try:
        if spec["ours"]:
            sliding_window_inference(volume, spec["roi"], predictor, 4, 0.5, mode="gaussian", device="cpu")
        else:
            from monai.inferers import sliding_window_inference as monai_swi

            monai_swi(volume, spec["roi"], 4, predictor, overlap=0.5, mode="gaussian", device="cpu")
    except Stop:
        pass
    return {"built": built, "peak": maxrss_mib(), "batches": min(calls["n"], spec["windows"])}


def gpu_train_peaks(size: int, feature_size: int, unet_base: int, device: torch.device):
    from peers import swin_contenders, unet_contenders
    from train_step import make_step, random_batch

    batch = random_batch(2, size)
    rows = []
    for amp_name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        for models in (swin_contenders(feature_size, size), unet_contenders(unet_base)):
            for label, model in models.items():
                step = make_step(model, batch, device, amp)
                # One step first: cuDNN's algorithm search takes a workspace from the allocator, and only
                # the first contender of each shape would pay it; AdamW's state then exists, as in training.
                step()
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                step()
                rows.append([f"train step {size}^3 batch 2, {amp_name}", label,
                             torch.cuda.max_memory_allocated(device) / 2**30,
                             "GiB (max_memory_allocated, the second step)"])
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
                model.to("cpu")  # only the contender being measured stays on the GPU
                del step
                torch.cuda.empty_cache()
    return rows


def restore_child(spec: dict) -> dict:
    """Peak RSS of one restoration in this (fresh) process, logits allocated first."""
    import numpy as np

    from mulmodseg.data import restore, restore_argmax
    from mulmodseg.predict import softmax_

    meta = spec["meta"]
    logits = torch.randn(14, *meta["shape"], generator=torch.Generator().manual_seed(0))
    built = maxrss_mib()
    if spec["restore"] == "nearest":
        label = restore(logits.argmax(0).to(torch.uint8).numpy(), meta, "nearest")
    else:
        label = restore_argmax(softmax_(logits).numpy(), meta)
    assert label.shape == tuple(meta["original_shape"]) and label.dtype == np.uint8
    return {"built": built, "peak": maxrss_mib(), "batches": 0}


def restore_rows(shape: tuple, spacing: tuple) -> list:
    """Restoration peaks, before and now, for a CT of ``shape`` voxels of ``spacing`` mm."""
    import nibabel as nib
    import numpy as np

    from mulmodseg.data import preprocess

    scan = nib.Nifti1Image(np.full(shape, 40, np.int16), np.diag([*spacing, 1.0]))
    meta = preprocess(scan, modality="CT", min_size=None)[2]
    rows = []
    for how, label in (("nearest", "before: argmax, then the label by nearest neighbour"),
                       ("scores", "now: softmax in place, scores restored linearly, argmax")):
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"restore": how, "meta": meta})],
                             capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([f"restoration {tuple(meta['shape'])} -> {shape}", label, res["peak"] / 1024,
                     f"GiB peak RSS ({res['built'] / 1024:.2f} with the logits alone)"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--shape", type=int, nargs=3, default=(266, 266, 300), help="training-space volume")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--windows", type=int, default=2, help="window batches before stopping (host memory)")
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--unet-base", type=int, default=32)
    parser.add_argument("--only", choices=["all", "swin", "unet"], default="all")
    parser.add_argument("--skip-host", action="store_true", help="only the GPU training-step peaks")
    parser.add_argument("--restore", action="store_true",
                        help="also restoration onto the original grid, before and now")
    parser.add_argument("--scan", type=int, nargs=3, default=(512, 512, 600), help="original CT for --restore")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(restore_child(spec) if "restore" in spec else child(spec)))
        return
    device = setup(args)
    if args.quick:
        args.shape, args.roi, args.windows, args.feature_size, args.unet_base = (64, 64, 64), 64, 1, 12, 4
    rows = []
    if device.type == "cuda":
        # Its own entry, written before the host runs: a time limit later keeps it.
        gpu_rows = gpu_train_peaks(96, args.feature_size, args.unet_base, device)
        report("Memory, GPU training step", device,
               format_table(["what", "contender", "peak", "unit / note"], gpu_rows),
               [f"SwinUNETR feature_size {args.feature_size}, UNet base {args.unet_base}"], write=not args.no_write)
    else:
        rows.append(["train step 96^3 batch 2 (GPU)", "all", "not measured", "no GPU lent"])
    shape = tuple(args.shape)
    output_gib = 14 * 4 * shape[0] * shape[1] * shape[2] / 2**30
    for backbone in [b for b in ("swin", "unet") if args.only in ("all", b) and not args.skip_host]:
        for ours in (True, False):
            spec = dict(backbone=backbone, ours=ours, shape=shape, roi=args.roi, windows=args.windows,
                        feature_size=args.feature_size, unet_base=args.unet_base)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            label = {("swin", True): "ours MulModSeg-Swin + our inferer",
                     ("swin", False): "MONAI Swin + ref head + MONAI inferer",
                     ("unet", True): "ours MulModSeg-UNet + our inferer",
                     ("unet", False): "our UNet + ref head + MONAI inferer"}[(backbone, ours)]
            rows.append([f"inference {shape}, CPU accumulation", label, res["peak"] / 1024,
                         f"GiB peak RSS ({res['built'] / 1024:.2f} after building; {res['batches']} window batches)"])
    if args.restore:
        rows += restore_rows((64, 64, 40) if args.quick else tuple(args.scan), (0.78, 0.78, 1.0))
    table = format_table(["what", "contender", "peak", "unit / note"], rows)
    notes = [f"inference: {args.roi}^3 windows, overlap 0.5, gaussian, sw_batch_size 4, fp32, feature_size "
             f"{args.feature_size}, UNet base {args.unet_base}; the float32 output alone is 14 x {shape} = "
             f"{output_gib:.2f} GiB; each row is a fresh subprocess"]
    if rows:
        report("Memory", device, table, notes, write=not args.no_write)


if __name__ == "__main__":
    main()
