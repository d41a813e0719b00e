"""3D UNet backbone of MulModSeg (the "unet" backbone of the reference code).

Layout (input ``(B, C_in, D, H, W)``, every spatial size divisible by 8):

==========  ===========================================  ===========================
stage       convs (in -> out channels)                   output
==========  ===========================================  ===========================
down_tr64   C_in->32, 32->64, max-pool                   skip 64 @ 1, 64 @ 1/2
down_tr128  64->64, 64->128, max-pool                    skip 128 @ 1/2, 128 @ 1/4
down_tr256  128->128, 128->256, max-pool                 skip 256 @ 1/4, 256 @ 1/8
down_tr512  256->256, 256->512 (no pool)                 512 @ 1/8  (``enc_last``)
up_tr256    up-conv 512->512, cat skip -> 768->256->256  256 @ 1/4
up_tr128    up-conv 256->256, cat skip -> 384->128->128  128 @ 1/2
up_tr64     up-conv 128->128, cat skip -> 192->64->64    64 @ 1     (``dec_last``)
==========  ===========================================  ===========================

Each conv is Conv3d(k=3, pad=1, bias) -> BatchNorm3d -> ReLU; up-convs are ConvTranspose3d(k=2, s=2);
the up-sampled tensor comes first in the concatenation, the skip second. Parameter names follow the
reference checkpoints (``down_tr64.ops.0.conv1.weight``, ``down_tr64.ops.0.bn1.running_mean``,
``up_tr64.up_conv.weight``, ...), so a reference state dict loads strictly. The optional output conv
is ``out_tr.final_conv`` (the name used by the reference's ``UNet3D_baseline``).

Deliberate differences from the reference:

* Normalisation is standard ``nn.BatchNorm3d``: batch statistics in training, running statistics in
  eval mode. The reference's ``ContBatchNorm3d`` always normalised with batch statistics (and kept
  updating the running averages) even in ``eval()``, so a voxel's prediction depended on which other
  sliding-window patches shared its batch. Reference checkpoints carry the same running-stat
  buffers, so they load unchanged; results in eval mode then use those stored statistics.
* No sigmoid on the logits: the reference baseline applied a sigmoid and then a softmax-based loss on
  top of it, which is a bug.
* Intermediate activations are not kept as module attributes (the reference stored all of them).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class LUConv(nn.Module):
    """Conv3d(k=3, pad=1) -> BatchNorm3d -> ReLU. ``x: (B, in_ch, D, H, W) -> (B, out_ch, D, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)), inplace=True)


def _two_convs(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(LUConv(in_ch, mid_ch), LUConv(mid_ch, out_ch))


class DownTransition(nn.Module):
    """Two LUConvs then (optionally) 2x max-pool; returns ``(pooled_or_same, pre_pool)``."""

    def __init__(self, in_ch: int, depth: int, pool: bool, base: int = 32) -> None:
        super().__init__()
        out_ch = 2 * base * 2**depth
        self.ops = _two_convs(in_ch, out_ch // 2, out_ch)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class UpTransition(nn.Module):
    """Transposed conv (x2), concat ``[up, skip]``, two LUConvs.

    ``x: (B, in_ch, d, h, w)``, ``skip: (B, in_ch // 2, 2d, 2h, 2w)`` -> ``(B, out_ch, 2d, 2h, 2w)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_ch, in_ch, kernel_size=2, stride=2)
        self.ops = _two_convs(in_ch + in_ch // 2, out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class OutputTransition(nn.Module):
    """1x1x1 conv to class logits (no activation). ``(B, 64, D, H, W) -> (B, n_classes, D, H, W)``."""

    def __init__(self, in_ch: int, n_classes: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_ch, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class UNet3D(nn.Module):
    """The reference 3D UNet backbone (19,073,600 parameters; 19,074,510 with a 14-class output conv).

    Args:
        in_channels: image channels C_in.
        out_channels: number of classes of the optional 1x1x1 output conv ``out_tr``; ``None`` builds
            the backbone only (then ``forward`` raises).
        base_channels: width of the first conv (32 in the reference); every stage scales with it. The
            stage names keep the reference's numbers (``down_tr64`` ...) whatever the width, so
            state-dict keys never change. Small widths are for tests and smoke runs.

    Attributes:
        enc_channels: ``16 * base_channels`` (512), channels of ``enc_last``.
        dec_channels: ``2 * base_channels`` (64), channels of ``dec_last``.
    """

    size_divisor = 8  # three 2x poolings: every spatial size must be a multiple of this

    def __init__(self, in_channels: int = 1, out_channels: Optional[int] = None, base_channels: int = 32) -> None:
        super().__init__()
        b = base_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.enc_channels = 16 * b
        self.dec_channels = 2 * b
        self.down_tr64 = DownTransition(in_channels, 0, pool=True, base=b)
        self.down_tr128 = DownTransition(2 * b, 1, pool=True, base=b)
        self.down_tr256 = DownTransition(4 * b, 2, pool=True, base=b)
        self.down_tr512 = DownTransition(8 * b, 3, pool=False, base=b)
        self.up_tr256 = UpTransition(16 * b, 8 * b)
        self.up_tr128 = UpTransition(8 * b, 4 * b)
        self.up_tr64 = UpTransition(4 * b, 2 * b)
        self.out_tr = OutputTransition(2 * b, out_channels) if out_channels is not None else None

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, C_in, D, H, W)``, D, H, W divisible by 8.

        Returns ``(enc_last, dec_last)``: ``(B, 512, D/8, H/8, W/8)`` and ``(B, 64, D, H, W)`` (at the
        default width).
        """
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise ValueError(f"UNet3D needs spatial sizes divisible by {self.size_divisor}, got {tuple(x.shape[2:])}")
        x, skip64 = self.down_tr64(x)
        x, skip128 = self.down_tr128(x)
        x, skip256 = self.down_tr256(x)
        enc_last, _ = self.down_tr512(x)
        x = self.up_tr256(enc_last, skip256)
        x = self.up_tr128(x, skip128)
        dec_last = self.up_tr64(x, skip64)
        return enc_last, dec_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, D, H, W)`` -> logits ``(B, out_channels, D, H, W)`` (no activation)."""
        if self.out_tr is None:
            raise RuntimeError("UNet3D was built with out_channels=None; use forward_features() or set out_channels")
        return self.out_tr(self.forward_features(x)[1])
