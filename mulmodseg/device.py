"""Where and in which precision to run: the ``--device`` and ``--amp`` options as torch objects."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide, with what to use instead."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is the GPU of this rank when there is one, else the CPU; otherwise a torch device string
    (``cpu``, ``cuda``, ``cuda:N``, ...), checked against the GPUs this machine has. ``cuda`` without an
    index is this rank's GPU, ``cuda:local_rank``: under torchrun every process gets its own (a bare
    ``cuda`` would put them all on the current GPU, 0).

    On CUDA this also turns on cuDNN autotuning: crops and sliding windows have one fixed shape, so
    timing the 3D convolution algorithms once per shape and keeping the fastest pays off (nnU-Net
    does the same).
    """
    if name == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
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


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``: None (fp32) for ``none``, and for ``auto`` off CUDA;
    bf16 for ``bf16``; fp16 for ``fp16``. ``auto`` on CUDA is bf16 where ``device`` itself computes it
    natively (compute capability 8, Ampere, or newer), else fp16: older GPUs only emulate bf16, far
    slower than fp16. The chosen GPU is asked, not the current one, which matters on a machine that
    mixes GPU generations."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    raise DeviceError(f"--amp must be auto, bf16, fp16 or none, got {amp!r}")
