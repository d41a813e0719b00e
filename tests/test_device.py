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


def test_device_names_are_checked_against_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for name in ("gpu", "CUDA", "cuda:x", ""):
        with pytest.raises(DeviceError, match=f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    with pytest.raises(DeviceError, match="--device cuda:5: this machine has 1 CUDA device.*below 1"):
        resolve_device("cuda:5")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")


def test_cuda_without_an_index_is_the_ranks_gpu(monkeypatch):
    """Under torchrun --device cuda puts rank N on cuda:LOCAL_RANK, not every rank on cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")  # an explicit index is kept
    with pytest.raises(DeviceError, match="this machine has 2 CUDA device"):
        resolve_device("cuda", local_rank=2)


@pytest.mark.parametrize("amp, device, expected", [
    ("auto", "cpu", None), ("none", "cuda", None),
    ("bf16", "cpu", torch.bfloat16), ("bf16", "cuda", torch.bfloat16), ("fp16", "cuda", torch.float16),
])
def test_autocast_dtype(amp, device, expected):
    assert autocast_dtype(amp, torch.device(device)) is expected


def test_auto_amp_asks_the_chosen_gpu_for_native_bf16(monkeypatch):
    # A machine with a pre-Ampere GPU 0 (bf16 only emulated) and an Ampere GPU 1; GPU 0 is current.
    capability = {0: (7, 0), 1: (8, 0)}
    asked = []

    def get_device_capability(device=None):
        index = 0 if device is None or device.index is None else device.index
        asked.append(index)
        return capability[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    assert autocast_dtype("auto", torch.device("cuda:1")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda:0")) is torch.float16
    assert autocast_dtype("auto", torch.device("cuda")) is torch.float16
    assert asked == [1, 0, 0]


def test_unknown_amp_is_a_clear_error():
    with pytest.raises(DeviceError, match="--amp must be auto, bf16, fp16 or none, got 'fp8'"):
        autocast_dtype("fp8", torch.device("cpu"))
