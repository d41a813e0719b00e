"""Sliding-window inference against MONAI's sliding_window_inference (oracle), plus our extras."""

import math

import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference as monai_swi
from torch import nn

from mulmodseg.inferer import gaussian_importance_map, sliding_window_inference, window_starts


class Predictor(nn.Module):
    """Conv net plus a term that depends on the voxel's place in the window.

    Zero padding and the in-window ramp make each window's output depend on where the window was cut,
    so a different window layout, misplaced windows or wrong blending weights all change the result.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 2, out_channels: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        torch.manual_seed(0)
        self.net = nn.Sequential(conv(in_channels, 4, 3, padding=1), nn.Tanh(), conv(4, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        y = self.net(x)
        channel_factor = torch.arange(1.0, y.shape[1] + 1).reshape(1, -1, *[1] * (x.dim() - 2))
        for axis in range(2, x.dim()):  # + (c + 1) * in-window coordinate in [0, 1], for every axis
            n = x.shape[axis]
            y = y + channel_factor * torch.linspace(0, 1, n).reshape([n if d == axis else 1 for d in range(x.dim())])
        return y * scale + shift


CASES = [  # (batch, spatial, roi, overlap, mode, sw_batch_size)
    (1, (20, 17, 13), (8, 8, 8), 0.5, "gaussian", 4),
    (2, (20, 17, 13), (8, 6, 10), 0.25, "constant", 3),
    (1, (13, 15, 9), (7, 9, 5), 0.75, "gaussian", 1),
    (1, (16, 16, 16), (8, 8, 8), 0.0, "gaussian", 3),
    (2, (10, 23, 9), (8, 8, 8), 0.0, "constant", 1),
    (1, (6, 18, 5), (8, 8, 8), 0.5, "gaussian", 4),  # ROI larger than the input along x and z
    (3, (5, 4, 12), (8, 8, 6), 0.25, "gaussian", 3),  # padded in two axes, batch crossing sw batches
    (1, (12, 12, 12), (12, 12, 12), 0.5, "gaussian", 2),  # one window
    (1, (9, 14, 7), (16, 16, 16), 0.75, "constant", 1),  # padded everywhere
    (2, (31, 22), (10, 7), 0.5, "gaussian", 3),  # 2-D
    (1, (13, 40), (16, 9), 0.75, "constant", 1),
    (1, (15, 11, 9), (-1, 6, 4), 0.5, "gaussian", 4),  # non-positive roi: whole axis
]


@pytest.mark.parametrize("batch,spatial,roi,overlap,mode,sw_batch_size", CASES)
def test_matches_monai(batch, spatial, roi, overlap, mode, sw_batch_size):
    predictor = Predictor(len(spatial))
    inputs = torch.randn(batch, 2, *spatial, generator=torch.Generator().manual_seed(len(CASES)))
    kwargs = dict(overlap=overlap, mode=mode, sigma_scale=0.125, cval=-0.5)
    expected = monai_swi(inputs, roi, sw_batch_size, predictor, **kwargs, scale=1.5, shift=0.25)
    ours = sliding_window_inference(inputs, roi, predictor, sw_batch_size, **kwargs, scale=1.5, shift=0.25)
    assert ours.dtype == torch.float32 and ours.shape == (batch, 3, *spatial)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_modes_match_monai(padding_mode):
    predictor = Predictor(3)
    inputs = torch.randn(1, 2, 6, 13, 7, generator=torch.Generator().manual_seed(1))
    expected = monai_swi(inputs, (8, 8, 8), 2, predictor, overlap=0.5, mode="gaussian", padding_mode=padding_mode)
    ours = sliding_window_inference(inputs, (8, 8, 8), predictor, 2, overlap=0.5, padding_mode=padding_mode)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_per_axis_overlap_and_sigma_match_monai():
    predictor = Predictor(3)
    inputs = torch.randn(1, 2, 17, 15, 12, generator=torch.Generator().manual_seed(2))
    kwargs = dict(overlap=(0.25, 0.5, 0.75), mode="gaussian", sigma_scale=(0.1, 0.2, 0.3))
    expected = monai_swi(inputs, (8, 7, 6), 3, predictor, **kwargs)
    ours = sliding_window_inference(inputs, (8, 7, 6), predictor, 3, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("roi,sigma", [((96, 96, 96), 0.125), ((7, 10, 5), 0.125), ((8, 9), (0.2, 0.05))])
def test_gaussian_map_equals_monai(roi, sigma):
    expected = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma, device="cpu")
    ours = gaussian_importance_map(roi, sigma)
    assert ours.dtype == torch.float32 and ours.shape == roi
    assert torch.equal(ours, expected)


def test_gaussian_map_floor():
    weights = gaussian_importance_map((96, 96, 96), 0.125)
    assert weights.min().item() == pytest.approx(1e-3, rel=1e-6)  # raw corner value ~4e-11 is clamped
    # Even ROI: the peak sits half a voxel from the centre along each axis, sigma = 12.
    assert weights.max().item() == pytest.approx(math.exp(-3 * 0.5**2 / (2 * 12**2)), rel=1e-6)


def test_window_starts():
    assert window_starts(10, 10, 0.5) == [0]
    assert window_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert window_starts(21, 8, 0.5) == [0, 4, 8, 12, 13]
    assert window_starts(10, 4, 0.0) == [0, 4, 6]
    assert window_starts(5, 2, 0.75) == [0, 1, 2, 3]  # step int(0.5) -> 1


def test_cpu_accumulation_equals_on_device_accumulation():
    predictor = Predictor(3)
    inputs = torch.randn(2, 2, 14, 19, 11, generator=torch.Generator().manual_seed(3))
    same_device = sliding_window_inference(inputs, (8, 8, 8), predictor, 4, sw_device="cpu", device="cpu")
    separate = sliding_window_inference(inputs, (8, 8, 8), predictor, 3, device=torch.device("cpu"))
    assert separate.device.type == "cpu"
    torch.testing.assert_close(separate, same_device, rtol=0, atol=0)


def test_flip_tta_with_equivariant_predictor_returns_plain_result():
    torch.manual_seed(4)
    conv = nn.Conv3d(2, 3, 3, padding=1)
    with torch.no_grad():  # a symmetric kernel makes the conv commute with every flip
        kernel = conv.weight
        for axis in (2, 3, 4):
            kernel = (kernel + kernel.flip(axis)) / 2
        conv.weight.copy_(kernel)
    inputs = torch.randn(1, 2, 13, 10, 9, generator=torch.Generator().manual_seed(5))
    plain = sliding_window_inference(inputs, (8, 8, 8), conv, 2, overlap=0.25)
    tta = sliding_window_inference(inputs, (8, 8, 8), conv, 2, overlap=0.25, tta_flips=True)
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-6)
    # A predictor that is not flip-equivariant does change under TTA, by the average of its flipped outputs.
    ramp = lambda x: x[:, :1] * 0 + torch.arange(x.shape[-1], dtype=x.dtype)  # noqa: E731
    flat = sliding_window_inference(inputs, (8, 8, 8), ramp, 2, tta_flips=True)
    torch.testing.assert_close(flat, torch.full_like(flat, 3.5), rtol=0, atol=1e-5)


def test_flip_tta_on_chosen_axes_averages_the_mirrored_passes():
    """A predictor that names classes by the side they are on (channel 1 on the low-x half, channel 2 on
    the high-x half): mirroring axis 2 only changes nothing, mirroring axis 0 splits the two sides' votes."""
    def by_side(x):
        low = (torch.arange(x.shape[2]) < x.shape[2] // 2).float()[None, :, None, None]
        return torch.stack([torch.zeros_like(x[:, 0]), low.expand_as(x[:, 0]), 1 - low.expand_as(x[:, 0])], 1)

    inputs = torch.randn(1, 1, 8, 6, 4)
    plain = sliding_window_inference(inputs, (8, 6, 4), by_side, 1)
    torch.testing.assert_close(sliding_window_inference(inputs, (8, 6, 4), by_side, 1, tta_flips=(2,)), plain)
    split = sliding_window_inference(inputs, (8, 6, 4), by_side, 1, tta_flips=(0,))
    torch.testing.assert_close(split[:, 1:], torch.full_like(split[:, 1:], 0.5))
    calls = []
    sliding_window_inference(inputs, (8, 6, 4), lambda x: calls.append(1) or by_side(x), 1, tta_flips=(1, 2))
    assert len(calls) == 4  # two axes: 2^2 passes
    with pytest.raises(ValueError, match="spatial axes"):
        sliding_window_inference(inputs, (8, 6, 4), by_side, 1, tta_flips=(3,))


def test_calls_batched_and_kwargs_forwarded():
    calls = []

    def predictor(x, modality):
        calls.append((x.shape[0], modality))
        return x[:, :1] * 2

    inputs = torch.randn(1, 1, 16, 16, 12)
    out = sliding_window_inference(inputs, 8, predictor, 3, overlap=0.5, mode="constant", modality="MR")
    windows = 3 * 3 * 2
    assert [n for n, _ in calls] == [3] * (windows // 3) and {m for _, m in calls} == {"MR"}
    torch.testing.assert_close(out, inputs * 2)


def test_autocast_bfloat16_close_to_float32():
    predictor = Predictor(3)
    inputs = torch.randn(1, 2, 12, 12, 12, generator=torch.Generator().manual_seed(6))
    full = sliding_window_inference(inputs, 8, predictor, 4)
    low = sliding_window_inference(inputs, 8, predictor, 4, autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert not torch.equal(low, full)  # autocast really took effect
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)


def test_progress_callback_and_line(capsys):
    seen = []
    inputs = torch.zeros(2, 1, 12, 12, 8)
    sliding_window_inference(inputs, 8, lambda x: x, 3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 8), (6, 8), (8, 8)]
    sliding_window_inference(inputs, 8, lambda x: x, 3, progress=True)
    err = capsys.readouterr().err
    assert "8/8 (100%)" in err
    # Every update clears the line first: "ETA 10 s" followed by "ETA 8 s" must not show "ETA 8 ss".
    updates = err.split("\r")[1:]
    assert len(updates) == 3 and all(u.startswith("\x1b[Ksliding window ") for u in updates)


def test_rejects_bad_arguments():
    inputs = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError):
        sliding_window_inference(inputs, (4, 4), lambda x: x, 1)
    with pytest.raises(ValueError):
        sliding_window_inference(inputs, 4, lambda x: x, 1, overlap=1.0)
    with pytest.raises(ValueError):
        sliding_window_inference(inputs, 4, lambda x: x[..., :2], 1)


@pytest.mark.parametrize("sw_batch_size", [0, -2, 2.5, None])
def test_rejects_a_window_batch_that_is_not_a_positive_integer(sw_batch_size):
    with pytest.raises(ValueError, match=f"sw_batch_size must be a positive integer, got {sw_batch_size}"):
        sliding_window_inference(torch.zeros(1, 1, 8, 8, 8), 4, lambda x: x, sw_batch_size)


def test_bf16_predictor_outputs_are_blended_in_float32():
    # Values 1 + k/128 are exact in bf16, and each window returns its input, so the exact blend is the input.
    # Summed in bf16 (8 mirrored passes, then Gaussian-weighted windows) they would be off by up to 2^-8.
    inputs = 1 + torch.randint(0, 128, (1, 1, 12, 12, 12), generator=torch.Generator().manual_seed(0)) / 128
    out = sliding_window_inference(inputs, 8, lambda x: x.to(torch.bfloat16), 4, overlap=0.5, tta_flips=True)
    assert out.dtype == torch.float32
    assert (out - inputs).abs().max().item() < 1e-6
