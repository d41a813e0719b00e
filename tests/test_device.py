"""Device and precision options: auto choices, clear errors, cuDNN autotuning on CUDA."""
import os

import pytest
import torch

from mulmodseg import device as mdevice
from mulmodseg.device import (
    DeviceError,
    accumulation_device,
    autocast_dtype,
    channels_last_inputs,
    cpu_has_native_bf16,
    cpu_trains_in_bf16,
    resolve_device,
    set_threads,
    usable_cores,
    use_channels_last,
)


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
    for name in ("GPU", "gpus", "CUDA", "cuda:x", ""):
        with pytest.raises(DeviceError, match=f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    with pytest.raises(DeviceError, match="--device cuda:5: this machine has 1 CUDA device.*below 1"):
        resolve_device("cuda:5")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    # TotalSegmentator's spelling: gpu is cuda, checked the same way.
    assert resolve_device("gpu") == resolve_device("gpu:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match="--device gpu:1: this machine has 1 CUDA device"):
        resolve_device("gpu:1")


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
    ("none", "cuda", None), ("none", "cpu", None),
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


SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\n" + SAPPHIRE_RAPIDS + "\nprocessor\t: 1\n" + SAPPHIRE_RAPIDS, True),
    ("flags\t\t: fpu avx2 avx512f avx512_bf16\n", True),  # Cooper Lake, Zen 4: AVX512-BF16 without AMX
    ("flags\t\t: fpu avx2 amx_bf16\n", True),
    ("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n", False),  # Skylake-SP: bf16 only emulated
    ("flags\t\t: fpu avx2 avx512f\nbugs\t\t: avx512_bf16\n", False),  # only the flags line counts
    ("processor\t: 0\nFeatures\t: fp asimd bf16\n", False),  # aarch64: no flags line
    ("", False),
])
def test_native_bf16_is_read_from_the_cpuinfo_flags(tmp_path, cpuinfo, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_has_native_bf16(path) is expected


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "absent") is False  # macOS, Windows
    assert cpu_trains_in_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize("cpuinfo, expected", [
    (SAPPHIRE_RAPIDS, True),
    ("flags\t\t: fpu avx2 avx512f avx512_bf16\n", False),  # Cooper Lake, Zen 4: inference in bf16, training fp32
    ("flags\t\t: fpu avx2\n", False),
])
def test_training_in_bf16_needs_amx(tmp_path, cpuinfo, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert cpu_trains_in_bf16(path) is expected


@pytest.mark.parametrize("native, amx, expected", [(True, True, torch.bfloat16), (True, False, None),
                                                   (False, False, None)])
def test_auto_amp_for_training_on_the_cpu_is_bf16_only_with_amx(monkeypatch, native, amx, expected):
    monkeypatch.setattr(mdevice, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(mdevice, "cpu_trains_in_bf16", lambda: amx)
    assert autocast_dtype("auto", torch.device("cpu"), training=True) is expected
    assert autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else None)  # inference
    assert autocast_dtype("bf16", torch.device("cpu"), training=True) is torch.bfloat16  # asked for


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_amp_on_the_cpu_is_bf16_only_with_bf16_units(monkeypatch, native, expected):
    monkeypatch.setattr(mdevice, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype("auto", torch.device("cpu")) is expected
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # forced either way
    assert autocast_dtype("none", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("mps")) is None


@pytest.mark.parametrize("setting, backbone, device, expected", [
    (None, "unet", "cpu", True), (None, "unet", "cuda", False), (None, "swinunetr", "cpu", False),
    (None, "swinunetr", "cuda", False), (True, "swinunetr", "cuda", True), (False, "unet", "cpu", False),
])
def test_channels_last_auto_is_the_unet_on_the_cpu(setting, backbone, device, expected):
    assert use_channels_last(setting, backbone, torch.device(device)) is expected


def test_channels_last_inputs_lays_out_the_windows_and_passes_the_arguments():
    seen = []

    def predictor(x, modality):
        seen.append((x.is_contiguous(memory_format=torch.channels_last_3d), modality))
        return x * 2

    x = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)
    out = channels_last_inputs(predictor)(x, modality="MR")
    assert seen == [(True, "MR")] and torch.equal(out, x * 2)


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 3, 5, 6, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert usable_cores() == 6
    assert [set_threads(0), set_threads(0, processes=2), set_threads(0, processes=8), set_threads(5)] == [6, 3, 1, 5]
    assert set_to == [6, 3, 1, 5]
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: no affinity mask
    assert usable_cores() == 16 and set_threads(0) == 16
    with pytest.raises(DeviceError, match="--threads -1: give a number of threads, or 0"):
        set_threads(-1)
    assert set_to == [6, 3, 1, 5, 16]


def test_accumulation_device_prefers_the_gpu_when_the_logits_fit():
    gpu, cpu = torch.device("cuda:1"), torch.device("cpu")
    shape = (256, 256, 160)
    need = 15 * 4 * 256 * 256 * 160  # 14 classes + the weight map, float32: 629 MB
    assert accumulation_device(gpu, 14, shape, free_bytes=4 * need) == gpu
    assert accumulation_device(gpu, 14, shape, free_bytes=4 * need - 1) == cpu
    assert accumulation_device(cpu, 14, shape, free_bytes=10**15) == cpu
