"""Shared helpers for the benchmarks: machine description, interleaved timing, result tables.

Every bench script times its contenders in one process, interleaved (A, B, C, A, B, C, ...), so that
load from other processes on a shared machine hits all of them alike; it reports medians and the
ratio of medians, prints a table and appends it to ``bench/RESULTS.md`` with the exact command.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable

import torch

from mulmodseg.device import resolve_device

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU's model name as lscpu/procinfo reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line naming the device, the CPU, torch and the date (UTC)."""
    cpu = f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    dev = "CPU only"
    if device.type == "cuda":
        dev = (f"{torch.cuda.get_device_name(device)} (TF32 convolutions {torch.backends.cudnn.allow_tf32}, "
               f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN autotune {torch.backends.cudnn.benchmark})")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; device: {dev}; CPU: {cpu}; torch {torch.__version__}; python {platform.python_version()}"


def command() -> str:
    """The command line that started this process, shell-quoted."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Run every ``fn`` ``warmup`` times, then ``repeats`` rounds of each in turn; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            print(f"  round {len(times[name])}/{repeats} {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; floats with 3 significant decimals."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, device: torch.device, table: str, notes: Sequence[str] = (), write: bool = True) -> None:
    """Print ``table`` and append it, with machine, command and notes, to bench/RESULTS.md."""
    text = "\n".join([f"### {title}", "", f"- machine: {machine(device)}", f"- command: `{command()}`",
                      *[f"- {n}" for n in notes], "", table, ""])
    print(text)
    if write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


def add_common_args(parser) -> None:
    """--device, --quick, --repeats, --warmup, --no-write, --threads."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test, not a measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")


def setup(args) -> torch.device:
    """Apply --threads and --quick defaults; return the device, resolved as the library does (on CUDA
    with cuDNN autotuning, which then applies to every contender alike)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 1, 0
        args.no_write = True
    return resolve_device(args.device)
