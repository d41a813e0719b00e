"""Where should the gradient guard's threshold sit? Total gradient norms of healthy training steps, per precision.

Trains the README's model (UNet base 8, one-hot text, ALT on the bundled CT + MR at 4.5 mm) for ``--steps`` steps
from the same seed, once per precision (fp32, and bf16 where the CPU or GPU has bf16 units: emulated bf16 on an
AVX2 CPU is two orders of magnitude slower and tells nothing), and prints the largest, median and smallest total
gradient norm, how many steps ``alt.GradientGuard`` (threshold 1e15) skipped, and the seconds per step.
``--repeats`` then runs one forward and backward of a tiny UNet on fixed inputs that many times per precision and
counts the norms above the threshold: what motivated the guard (5 of 40 tries between 1e29 and 1e35 in bf16 on an
AVX512-BF16 CPU, none on one with AMX).

    python bench/gradient_guard.py                 # about 3 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from mulmodseg import data as mdata  # noqa: E402
from mulmodseg.alt import GradientGuard  # noqa: E402
from mulmodseg.config import BUNDLED_SAMPLE  # noqa: E402
from mulmodseg.device import autocast_dtype  # noqa: E402
from mulmodseg.losses import DiceCELoss  # noqa: E402
from mulmodseg.model import MulModSeg  # noqa: E402
from mulmodseg.text.prompts import model_table, resolve_classes  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per precision (half CT, half MR)")
    p.add_argument("--roi", type=int, default=48)
    p.add_argument("--repeats", type=int, default=40, help="tiny forward/backward passes per precision")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement; writes nothing")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.roi, args.repeats, args.no_write = 2, 32, 2, True
    return args


def norms_of_training(amp: torch.dtype | None, steps: int, roi: int) -> tuple[list[float], float]:
    """Total gradient norms of ``steps`` ALT steps (before any update is skipped) and the seconds per step."""
    torch.manual_seed(0)
    classes = resolve_classes("amos")
    model = MulModSeg("unet", len(classes), *model_table("onehot", ("CT", "MR"), classes), base_channels=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn, guard = DiceCELoss(), GradientGuard()
    settings = {name: {**mdata.default_settings(name), "spacing": [4.5] * 3, "min_size": [roi] * 3}
                for name in ("CT", "MR")}
    crops = {}
    for name in ("CT", "MR"):
        case = mdata.discover_cases(BUNDLED_SAMPLE / name.lower(), name)[0]
        image, label, _ = mdata.preprocess(case.image, case.label, name, **settings[name])
        crops[name] = mdata.CropDataset([(image, label)], (roi,) * 3, num_samples=4, positive_centres="class", seed=0)
    norms, t0 = [], time.time()
    for step in range(steps):
        name = ("CT", "MR")[step % 2]
        crops[name].set_epoch(step)
        batch = crops[name][0]
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(batch["image"], name)
        loss = sum(loss_fn.terms(logits.float(), batch["label"]))
        loss.backward()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        norms.append(norm)
        if guard.admits(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms, (time.time() - t0) / steps


def tiny_norms(amp: torch.dtype | None, repeats: int) -> list[float]:
    """The total gradient norm of one forward and backward of a tiny UNet on fixed inputs, ``repeats`` times."""
    torch.manual_seed(0)
    model = MulModSeg("unet", 3, *model_table("onehot", ("CT",), ("bg", "a", "b")), base_channels=4)
    image, label = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    norms = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(image, "CT")
        sum(DiceCELoss().terms(logits.float(), label)).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
    return norms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")
    precisions = {"fp32": None}
    if autocast_dtype("auto", device) == torch.bfloat16:
        precisions["bf16"] = torch.bfloat16
    threshold = GradientGuard().max_norm
    lines = ["| precision | steps | largest norm | median | smallest | skipped (> 1e15 or not finite) | s/step | "
             f"tiny passes > 1e15 (of {args.repeats}) | tiny passes' largest norm |", "|---|" + "---:|" * 8]
    for name, amp in precisions.items():
        norms, seconds = norms_of_training(amp, args.steps, args.roi)
        tiny = tiny_norms(amp, args.repeats)
        bad = sum(not (np.isfinite(n) and n <= threshold) for n in norms)
        tiny_bad = sum(not (np.isfinite(n) and n <= threshold) for n in tiny)
        lines.append(f"| {name} | {len(norms)} | {max(norms):.3g} | {np.median(norms):.3g} | {min(norms):.3g} | "
                     f"{bad} | {seconds:.2f} | {tiny_bad} | {max(tiny):.3g} |")
    notes = [f"README model (UNet base 8, one-hot, 4.5 mm), {args.roi}^3 x 4 crops, AdamW lr 3e-3, the bundled pair"]
    if "bf16" not in precisions:
        notes.append("bf16 not measured: this CPU has no bf16 units (no AMX or AVX512-BF16), so --amp auto trains "
                     "in fp32 here and autocast's emulated bf16 is about 100x slower")
    report("Gradient norms of healthy steps (bench/gradient_guard.py)", device, "\n".join(lines) + "\n", notes,
           write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
