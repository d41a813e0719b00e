"""Where, in which precision and how to run: ``--device``, ``--amp``, ``--channels_last`` and ``--threads``."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from mulmodseg.errors import UserError

# /proc/cpuinfo flags of CPUs that multiply bf16 matrices in hardware: Intel AMX (from Sapphire Rapids) and
# AVX512-BF16 (from Intel Cooper Lake and AMD Zen 4).
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


class DeviceError(UserError, ValueError):
    """A device or precision that this machine cannot provide, with what to use instead (a ``ValueError`` too, for
    callers that catch a bad value)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the GPU of this rank when there is one, else the CPU; otherwise a torch device string
    (``cpu``, ``cuda``, ``cuda:N``, ...), checked against the GPUs this machine has; ``gpu`` and ``gpu:N``
    are ``cuda`` and ``cuda:N`` (TotalSegmentator's spelling). ``cuda`` without an index is this rank's GPU,
    ``cuda:local_rank``: under torchrun every process gets its own (a bare ``cuda`` would put them all on
    the current GPU, 0).

    On CUDA this also turns on cuDNN autotuning: crops and sliding windows have one fixed shape, so
    timing the 3D convolution algorithms once per shape and keeping the fastest pays off (nnU-Net
    does the same).
    """
    if name == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(re.sub(r"^gpu(?=$|:)", "cuda", name))
        except RuntimeError as e:
            raise DeviceError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from e
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"--device {name}: no CUDA device is available here; use --device cpu")
            count = torch.cuda.device_count()
            if device.index is None:
                device = torch.device("cuda", local_rank)
            if device.index >= count:
                raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s), "
                                  f"so N in cuda:N must be below {count}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The ``flags`` of Linux's ``cpuinfo`` (every core lists the same: the first line says it); empty where that
    file is absent (macOS, Windows) or has no flags line (aarch64)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matrix units: ``amx_bf16`` or ``avx512_bf16`` among its ``cpu_flags``.
    oneDNN's own ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not the test: it is also True on plain
    AVX512 CPUs, which only emulate bf16."""
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags(cpuinfo))


def cpu_trains_in_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether ``--amp auto`` trains in bf16 on this CPU: only with AMX (``amx_bf16``). On a Zen 4 EPYC
    (AVX512-BF16, no AMX) 5 of 40 bf16 backward passes of a tiny UNet gave a conv weight gradient of 1e29 to 1e35
    (fp32 never above 0.04; with AMX 0 of 40; ``bench/gradient_guard.py --repeats``): the guard skips such steps,
    but the steps it lets through come from the same kernels, so training there is fp32 unless asked
    (``--amp bf16``). Inference has no backward pass and keeps bf16 on every CPU with bf16 units."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def autocast_dtype(amp: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``: None (fp32) for ``none``; bf16 for ``bf16``; fp16 for
    ``fp16``. ``auto`` on CUDA is bf16 where ``device`` itself computes it natively (compute capability 8,
    Ampere, or newer), else fp16: older GPUs only emulate bf16, far slower than fp16. The chosen GPU is
    asked, not the current one, which matters on a machine that mixes GPU generations. ``auto`` on the
    CPU is bf16 where the CPU has bf16 matrix units (``cpu_has_native_bf16``), else None (fp32),
    also on CPUs that only emulate bf16; for ``training``, only where it has AMX (``cpu_trains_in_bf16``). On any
    other device ``auto`` is None."""
    if amp == "none":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if amp == "auto" and device.type == "cpu":
        native = cpu_trains_in_bf16() if training else cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    if amp == "auto":
        return None
    raise DeviceError(f"--amp must be auto, bf16, fp16 or none, got {amp!r}")


def use_channels_last(setting: bool | None, backbone: str, device: torch.device) -> bool:
    """Whether the network and its inputs take the channels_last_3d layout: ``setting`` when it is True or
    False; for None (auto) only the UNet on the CPU, the one place it measured faster (bench/RESULTS.md)."""
    if setting is not None:
        return setting
    return backbone == "unet" and device.type == "cpu"


def channels_last_inputs(predictor: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``predictor`` called with its input ``(B, C, D, H, W)`` laid out as channels_last_3d: a network
    converted to that format runs its convolutions in it only when the input is too, and the sliding
    window's crops come contiguous."""
    def predict(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return predictor(x.contiguous(memory_format=torch.channels_last_3d), *args, **kwargs)
    return predict


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS keeps one (Linux; a container
    or ``taskset`` narrows it), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int, processes: int = 1) -> int:
    """Set torch's intra-op threads for ``--threads`` and return how many: ``threads``, or for 0 the
    ``usable_cores`` shared among the ``processes`` that run on this machine (torchrun's ranks), at
    least one each: more threads than cores make every rank slower."""
    if threads < 0:
        raise DeviceError(f"--threads {threads}: give a number of threads, or 0 for the cores this process may use")
    count = threads or max(1, usable_cores() // processes)
    torch.set_num_threads(count)
    return count


def accumulation_device(device: torch.device, num_classes: int, shape: Sequence[int], free_bytes: int
                        ) -> torch.device:
    """Where the sliding window blends a scan of ``shape`` (X, Y, Z): on the GPU when its float32 logits
    and weight map take at most a quarter of the ``free_bytes`` there (the rest is headroom for the
    windows' activations), else on the CPU. Blending on the GPU avoids copying every window's
    (K, *roi) output to the host, which would take longer than the network on a fast GPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    need = (num_classes + 1) * 4 * math.prod(shape)
    return device if 4 * need <= free_bytes else torch.device("cpu")
