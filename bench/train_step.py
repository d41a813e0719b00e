"""Training-step speed: forward + backward + AdamW step on a batch of 2 crops, ours vs the peers.

SwinUNETR: our MulModSeg-SwinUNETR vs MONAI's SwinUNETR + the reference per-sample head (same weights)
and MONAI's vision-only SwinUNETR. UNet: our MulModSeg-UNet vs our UNet3D backbone + the reference
head (MONAI has no network of that architecture), plus our model in channels_last_3d memory format.
All contenders use ``mulmodseg.alt.train_step`` with our DiceCELoss, interleaved in one process.

CPU default: 64^3 crops, feature_size 48. GPU default: 96^3, with ``--amp bf16`` and ``--compile`` options
that apply to every contender, and ``--also bf16 bf16+compile bf16+channels_last``, which adds our model
with bf16 autocast (alone, with torch.compile, or in channels_last_3d) beside peers that stay at ``--amp``:
the "ours in bf16 against the fp32 MONAI baseline" ratio.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, format_table, interleaved, median, report, setup, sync  # noqa: E402
from peers import swin_contenders, unet_contenders, with_sdpa_attention  # noqa: E402

from mulmodseg.alt import train_step  # noqa: E402
from mulmodseg.losses import DiceCELoss  # noqa: E402


def random_batch(batch: int, size: int) -> dict:
    """A seeded training batch: image (batch, 1, size^3) uniform in [0, 1), labels of 14 classes."""
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(batch, 1, size, size, size, generator=g),
            "label": torch.randint(0, 14, (batch, 1, size, size, size), generator=g)}


def make_step(model: torch.nn.Module, batch: dict, device: torch.device, amp, channels_last: bool = False):
    """A closure running one train_step of ``model`` on ``batch`` (moved to ``device`` once, so that no
    contender's time includes the host-to-device copy)."""
    model.to(device).train()
    batch = {key: value.to(device) for key, value in batch.items()}
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
        batch = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last_3d))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    loss_fn = DiceCELoss()
    return lambda: train_step(model, batch, "CT", loss_fn=loss_fn, optimizer=optimizer, scaler=scaler, device=device,
                              amp_dtype=amp)


def ours_variants(build, label: str, variants, batch: dict, device: torch.device, notes: list, amp=None) -> dict:
    """Extra contenders: our model ``build()[label]`` (same seed, same weights) in each setting of ``variants``,
    names joined by "+": ``bf16`` autocast (else ``amp``), ``compile`` (torch.compile, inductor) and
    ``channels_last`` (channels_last_3d weights and crops), e.g. ``bf16+compile`` or ``channels_last+compile``.
    Each is tried once first: one that fails (e.g. a compiler missing on the machine) is left out with a note in
    ``notes``, and the other rows are still measured."""
    fns = {}
    for variant in variants:
        parts = variant.split("+")
        model = build()[label]
        if "compile" in parts:
            model = torch.compile(model)
        fn = make_step(model, batch, device, torch.bfloat16 if "bf16" in parts else amp,
                       channels_last="channels_last" in parts)
        try:
            fn()
            sync(device)
        except Exception as error:  # an optional row must not cost the whole table
            notes.append(f"{label}, {variant}: left out, it failed ({type(error).__name__}: {str(error)[:200]})")
            print(f"  {notes[-1]}", file=sys.stderr, flush=True)
            continue
        fns[f"{label}, {variant}"] = fn
    return fns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--size", type=int, default=None, help="crop side (default 96 on GPU, 64 on CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--feature-size", type=int, default=48)
    parser.add_argument("--unet-base", type=int, default=32)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile every contender")
    parser.add_argument("--only", choices=["all", "swin", "unet"], default="all")
    parser.add_argument("--also", nargs="*", default=[],
                        choices=["bf16", "bf16+compile", "bf16+channels_last", "compile", "channels_last+compile"],
                        help="also time our model in these settings while the peers keep --amp (compile: "
                        "torch.compile; channels_last: channels_last_3d, train.py's layout for the UNet on the CPU)")
    parser.add_argument("--before", action="store_true",
                        help="also time our SwinUNETR with SDPA window attention (the code before the fix)")
    args = parser.parse_args(argv)
    device = setup(args)
    if args.quick:  # MONAI's SwinUNETR needs >= 64^3 (its instance norm rejects one voxel at 1/32)
        args.size = args.size or (64 if args.only in ("all", "swin") else 32)
        args.feature_size, args.unet_base = 12, 4
    size = args.size or (96 if device.type == "cuda" else 64)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    batch = random_batch(args.batch, size)
    groups = []
    if args.only in ("all", "swin"):
        models = swin_contenders(args.feature_size, size)
        if args.before:
            before = swin_contenders(args.feature_size, size, vision_only=False)["ours MulModSeg-Swin"]
            models["ours MulModSeg-Swin, SDPA attention (before)"] = with_sdpa_attention(before)
        build = partial(swin_contenders, args.feature_size, size, vision_only=False)
        groups.append(("SwinUNETR", models, "MONAI Swin + ref head", build, "ours MulModSeg-Swin"))
    if args.only in ("all", "unet"):
        build = partial(unet_contenders, args.unet_base)
        groups.append(("UNet", build(), "our UNet + ref head", build, "ours MulModSeg-UNet"))
    for name, models, baseline, build, ours_label in groups:
        fns, notes = {}, []
        for label, model in models.items():
            if args.compile:
                model = torch.compile(model)
            fns[label] = make_step(model, batch, device, amp)
        if name == "UNet" and device.type == "cpu" and not args.quick:
            cl = unet_contenders(args.unet_base)["ours MulModSeg-UNet"]
            fns["ours MulModSeg-UNet channels_last_3d"] = make_step(cl, batch, device, amp, channels_last=True)
        fns.update(ours_variants(build, ours_label, args.also, batch, device, notes, amp))
        times = interleaved(fns, args.repeats, args.warmup, device)
        base = median(times[baseline])
        rows = [[name, label, median(t), min(t), max(t), base / median(t), args.batch / median(t)]
                for label, t in times.items()]
        table = format_table(["backbone", "contender", "median s/step", "min", "max", "speed-up vs ref-head peer",
                              "crops/s"], rows)
        notes.insert(0, f"batch {args.batch} crops of {size}^3, SwinUNETR feature_size {args.feature_size}, UNet base "
                        f"{args.unet_base}, amp {args.amp}, compile {args.compile} (a row whose name ends in a setting "
                        f"of --also, e.g. ', bf16+compile', runs ours in that setting instead); "
                        f"{args.repeats} interleaved rounds after {args.warmup} warm-up; speed-up = peer median / "
                        "contender median (same group)")
        # One entry per backbone, written as soon as it is measured: a time limit later keeps it.
        report(f"Training step (fwd + bwd + AdamW), {name}", device, table, notes, write=not args.no_write)


if __name__ == "__main__":
    main()
