"""Device and precision options: auto choices, clear errors, cuDNN autotuning on CUDA."""
import pytest
import torch

from mulmodseg.device import DeviceError, autocast_dtype, resolve_device


def test_auto_is_the_cpu_without_cuda_and_explicit_cuda_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="--device cuda:1: no CUDA device.*--device cpu"):
        resolve_device("cuda:1")


def test_auto_picks_the_ranks_gpu_and_turns_on_cudnn_autotuning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda:3")
    assert torch.backends.cudnn.benchmark is True


def test_cpu_leaves_cudnn_alone(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    resolve_device("cpu")
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("amp, device, expected", [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16), ("none", "cuda", None),
    ("bf16", "cpu", torch.bfloat16), ("fp16", "cuda", torch.float16),
])
def test_autocast_dtype(amp, device, expected):
    assert autocast_dtype(amp, torch.device(device)) is expected


def test_unknown_amp_is_a_clear_error():
    with pytest.raises(DeviceError, match="--amp must be auto, bf16, fp16 or none, got 'fp8'"):
        autocast_dtype("fp8", torch.device("cpu"))
