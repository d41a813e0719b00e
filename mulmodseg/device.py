"""Where and in which precision to run: the ``--device`` and ``--amp`` options as torch objects."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide, with what to use instead."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the GPU of this rank when there is one, else the CPU.

    On CUDA this also turns on cuDNN autotuning: crops and sliding windows have one fixed shape, so
    timing the 3D convolution algorithms once per shape and keeping the fastest pays off (nnU-Net
    does the same).
    """
    if name == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``: None (fp32) for ``none``, and for ``auto`` off CUDA;
    bf16 for ``bf16`` and for ``auto`` on CUDA; fp16 for ``fp16``."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp in ("bf16", "auto"):
        return torch.bfloat16
    raise DeviceError(f"--amp must be auto, bf16, fp16 or none, got {amp!r}")
