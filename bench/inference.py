"""Whole-scan sliding-window inference: our inferer + our networks vs MONAI's sliding_window_inference + peers.

Same weights everywhere. SwinUNETR group: our MulModSeg-SwinUNETR (our inferer) vs MONAI SwinUNETR +
the reference per-sample head (MONAI's inferer), and the vision-only pair: our SwinUNETR vs MONAI's
SwinUNETR (same state dict), each with its own inferer. UNet group: our MulModSeg-UNet (our inferer)
vs our UNet3D + the reference head (MONAI's inferer). Gaussian blending, overlap 0.5, sw_batch_size 4,
fp32 (or ``--amp bf16``), eval mode, no gradients. Reports seconds per case, windows per second and the
largest difference between each pair's outputs.

GPU default: a 256 x 256 x 160 volume (an AMOS CT after resampling) with a 96^3 window. CPU default:
128 x 96 x 64 with a 64^3 window, to keep runs short on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, format_table, interleaved, median, report, setup  # noqa: E402
from peers import VisionOnly, monai_merge_order, swin_contenders, unet_contenders, with_sdpa_attention  # noqa: E402

from mulmodseg.device import autocast_dtype, channels_last_inputs, use_channels_last  # noqa: E402
from mulmodseg.inferer import sliding_window_inference, window_starts  # noqa: E402
from mulmodseg.model import MulModSeg  # noqa: E402


def dtype_name(dtype: torch.dtype | None) -> str:
    """"bf16", "fp16" or "fp32" (None: no autocast)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def n_windows(shape, roi: int, overlap: float) -> int:
    """Windows our (and MONAI's) layout uses for a volume of ``shape``."""
    count = 1
    for s in shape:
        count *= len(window_starts(max(s, roi), roi, overlap))
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="volume D H W")
    parser.add_argument("--roi", type=int, default=None)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--unet-base", type=int, default=32)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--only", choices=["all", "swin", "unet"], default="all")
    parser.add_argument("--before", action="store_true",
                        help="also time our SwinUNETR with SDPA window attention (the code before the fix)")
    parser.add_argument("--also", nargs="*", choices=["auto", "channels_last", "sw16"], default=[],
                        help="also time our MulModSeg models with infer.py's automatic settings on this machine "
                             "(auto: bf16 where the CPU has bf16 units, channels_last_3d for the UNet on the CPU), "
                             "with channels_last_3d weights, or with 16 windows per predictor call instead of "
                             "--sw-batch-size (same weights, same peer at --amp)")
    args = parser.parse_args(argv)
    device = setup(args)
    from monai.inferers import sliding_window_inference as monai_swi

    gpu = device.type == "cuda"
    if args.quick:
        args.shape, args.roi, args.feature_size, args.unet_base = (96, 64, 64), 64, 12, 4
    shape = tuple(args.shape or ((256, 256, 160) if gpu else (128, 96, 64)))
    roi = args.roi or (96 if gpu else 64)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    volume = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    def ours(model, sw_batch_size=args.sw_batch_size, autocast=amp, **kw):
        return lambda: sliding_window_inference(volume, roi, model, sw_batch_size, args.overlap,
                                                mode="gaussian", autocast_dtype=autocast, **kw)

    def variants(model, backbone: str, label: str, peer_label: str, fns: dict, pairs: list) -> None:
        """Add ``--also`` rows: a copy of our ``model`` (same weights) run as each variant, against ``peer_label``.
        ``auto`` is what infer.py's defaults pick here (``--amp auto``, ``--channels_last auto``)."""
        for variant in args.also:
            twin = copy.deepcopy(model)
            name = f"{label}, {variant}"
            if variant == "auto":
                dtype = autocast_dtype("auto", device)
                layout = use_channels_last(None, backbone, device)
                name = f"{label}, auto: {dtype_name(dtype)}{', channels_last' if layout else ''}"
                predictor = twin.to(memory_format=torch.channels_last_3d) if layout else twin
                fns[name] = ours(channels_last_inputs(predictor) if layout else predictor, modality="CT",
                                 autocast=dtype)
            elif variant == "channels_last":
                fns[name] = ours(twin.to(memory_format=torch.channels_last_3d), modality="CT")
            else:
                fns[name] = ours(twin, sw_batch_size=16, modality="CT")
            pairs.append((name, peer_label))

    def theirs(model, **kw):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                return monai_swi(volume, roi, args.sw_batch_size, partial(model, **kw), overlap=args.overlap,
                                 mode="gaussian").float()
        return run

    groups = []
    if args.only in ("all", "swin"):
        c = swin_contenders(args.feature_size, roi)
        mine = MulModSeg("swinunetr", 14, embeddings=None, feature_size=args.feature_size,
                         merge_order=monai_merge_order())
        mine.backbone.load_state_dict(c["MONAI Swin vision-only"].net.state_dict())
        fns = {"ours MulModSeg-Swin + our inferer": ours(c["ours MulModSeg-Swin"].to(device).eval(), modality="CT"),
               "MONAI Swin + ref head + MONAI inferer": theirs(c["MONAI Swin + ref head"].to(device).eval(),
                                                               modality="CT"),
               "ours Swin vision-only + our inferer": ours(VisionOnly(mine).to(device).eval()),
               "MONAI Swin vision-only + MONAI inferer": theirs(c["MONAI Swin vision-only"].to(device).eval())}
        pairs = [("ours MulModSeg-Swin + our inferer", "MONAI Swin + ref head + MONAI inferer"),
                 ("ours Swin vision-only + our inferer", "MONAI Swin vision-only + MONAI inferer")]
        variants(c["ours MulModSeg-Swin"], "swinunetr", "ours MulModSeg-Swin + our inferer",
                 "MONAI Swin + ref head + MONAI inferer", fns, pairs)
        if args.before:
            before = with_sdpa_attention(
                swin_contenders(args.feature_size, roi, vision_only=False)["ours MulModSeg-Swin"])
            fns["ours MulModSeg-Swin, SDPA attention (before)"] = ours(before.to(device).eval(), modality="CT")
            pairs.append(("ours MulModSeg-Swin, SDPA attention (before)", "MONAI Swin + ref head + MONAI inferer"))
        groups.append(("SwinUNETR", fns, pairs))
    if args.only in ("all", "unet"):
        c = unet_contenders(args.unet_base)
        fns = {"ours MulModSeg-UNet + our inferer": ours(c["ours MulModSeg-UNet"].to(device).eval(), modality="CT"),
               "our UNet + ref head + MONAI inferer": theirs(c["our UNet + ref head"].to(device).eval(), modality="CT")}
        pairs = [tuple(fns)]
        variants(c["ours MulModSeg-UNet"], "unet", "ours MulModSeg-UNet + our inferer",
                 "our UNet + ref head + MONAI inferer", fns, pairs)
        groups.append(("UNet", fns, pairs))
    windows = n_windows(shape, roi, args.overlap)
    for name, fns, pairs in groups:
        rows = []
        times = interleaved(fns, args.repeats, args.warmup, device)
        done = set()
        for mine_label, peer_label in pairs:
            diff = (fns[mine_label]() - fns[peer_label]()).abs().max().item()
            for label in (mine_label, peer_label):
                if label in done:
                    continue
                done.add(label)
                t = median(times[label])
                rows.append([name, label, t, min(times[label]), max(times[label]), windows / t,
                             median(times[peer_label]) / t, f"{diff:.2e}"])
        table = format_table(["backbone", "contender", "median s/case", "min", "max", "windows/s",
                              "speed-up vs peer", "max abs diff vs peer"], rows)
        notes = [f"volume {shape}, window {roi}^3, overlap {args.overlap}, gaussian, sw_batch_size "
                 f"{args.sw_batch_size}, {windows} windows; SwinUNETR feature_size {args.feature_size}, UNet base "
                 f"{args.unet_base}; amp {args.amp}; {args.repeats} interleaved rounds after {args.warmup} warm-up; a "
                 "row ending in ', channels_last' runs our model with channels_last_3d weights, one ending in ', sw16' "
                 "with 16 windows per call, one with ', auto: ...' in infer.py's automatic settings on this machine, "
                 "against the same peer"]
        # One entry per backbone, written as soon as it is measured: a time limit later keeps it.
        report(f"Whole-scan inference, {name}", device, table, notes, write=not args.no_write)


if __name__ == "__main__":
    main()
