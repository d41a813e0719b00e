"""Where a training step of ours spends its time: torch.profiler over one step after warm-up.

Prints the operators with the most self time on the device (CUDA) or the CPU, for MulModSeg-SwinUNETR
or -UNet at the bench's sizes. Not a comparison, so nothing is appended to RESULTS.md: it is the
"profile where we fall short" step, meant for one run on a lent GPU (bench/gpu.sh runs it after the memory step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, machine, setup  # noqa: E402
from peers import swin_contenders, unet_contenders  # noqa: E402
from train_step import make_step, random_batch  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--backbone", choices=["swin", "unet"], default="swin")
    parser.add_argument("--size", type=int, default=None, help="crop side (default 96 on GPU, 64 on CPU)")
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--unet-base", type=int, default=32)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--batch", type=int, default=2, help="crops per step")
    parser.add_argument("--channels-last", action="store_true", help="model and crops in channels_last_3d (train.py's "
                        "default for the UNet on the CPU)")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.size, args.feature_size, args.unet_base = args.size or (64 if args.backbone == "swin" else 32), 12, 4
    size = args.size or (96 if device.type == "cuda" else 64)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if args.backbone == "swin":
        model = swin_contenders(args.feature_size, size, vision_only=False)["ours MulModSeg-Swin"]
    else:
        model = unet_contenders(args.unet_base)["ours MulModSeg-UNet"]
    batch = random_batch(args.batch, size)
    step = make_step(model, batch, device, amp, channels_last=args.channels_last)
    for _ in range(max(args.warmup, 1)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    layout = ", channels_last_3d" if args.channels_last else ""
    print(f"### Profile of one training step: ours {args.backbone}, batch {args.batch} x {size}^3, "
          f"amp {args.amp}{layout}")
    print(f"- machine: {machine(device)}\n")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
