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

* Normalisation is ``DomainBatchNorm3d``: batch statistics in training, running statistics in eval
  mode, with one set of running statistics per *domain* (``norm_domains``; MulModSeg makes one per
  modality) and the affine weights shared. Each sample is normalised with its own domain's statistics,
  so a CT and an MR in one batch never mix, and at inference each modality gets the statistics it
  trained with rather than their pooled average (which fits neither). ``norm_domains=1`` is plain
  ``nn.BatchNorm3d`` with the same buffers. The reference's ``ContBatchNorm3d`` always normalised
  with batch statistics (and kept updating the running averages) even in ``eval()``, so a voxel's
  prediction depended on which other sliding-window patches shared its batch. Reference checkpoints
  load unchanged; with several domains their single set of running statistics goes to every domain.
* No sigmoid on the logits: the reference baseline applied a sigmoid and then a softmax-based loss on
  top of it, which is a bug.
* Intermediate activations are not kept as module attributes (the reference stored all of them).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# Which samples of a batch belong to which domain: [(domain, sample indices or None for all)].
Groups = Sequence[tuple[int, Optional[torch.Tensor]]]


def domain_groups(domain: torch.Tensor | None, batch_size: int) -> list[tuple[int, torch.Tensor | None]]:
    """``domain: (B,)`` integer ids (or None: all 0) -> one ``(id, indices)`` per id present; ``indices``
    is None when the whole batch has that id (no gather, no scatter)."""
    if domain is None:
        return [(0, None)]
    if domain.shape != (batch_size,):
        raise ValueError(f"domain must hold one id per sample, shape ({batch_size},), got {tuple(domain.shape)}")
    ids = domain.tolist()
    if len(set(ids)) == 1:
        return [(ids[0], None)]
    return [(d, (domain == d).nonzero().flatten()) for d in sorted(set(ids))]


class DomainBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d with one set of running statistics per domain and shared ``weight``/``bias``.

    Buffers ``running_mean``/``running_var`` are ``(C,)`` for one domain (exactly ``nn.BatchNorm3d``)
    and ``(num_domains, C)`` for several. ``forward(x, groups)`` normalises each group of samples with
    its domain's statistics: batch statistics of the group in training (updating that domain's running
    averages), the domain's running statistics in eval mode. A state dict with ``(C,)`` statistics (the
    reference's, or a one-domain model's) loads into every domain.
    """

    def __init__(self, num_features: int, num_domains: int = 1) -> None:
        super().__init__(num_features)
        self.num_domains = num_domains
        if num_domains > 1:
            self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
            self.register_buffer("running_var", torch.ones(num_domains, num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("running_mean", "running_var"):
            value = state_dict.get(prefix + name)
            if self.num_domains > 1 and value is not None and value.dim() == 1:
                state_dict[prefix + name] = value.expand(self.num_domains, -1).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def stats(self, domain: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The running (mean, var) of ``domain``, as views that batch_norm updates in place."""
        if self.num_domains == 1:
            return self.running_mean, self.running_var
        if not 0 <= domain < self.num_domains:
            raise ValueError(f"domain {domain} out of range: this layer has {self.num_domains} domains")
        return self.running_mean[domain], self.running_var[domain]

    def forward(self, x: torch.Tensor, groups: Groups = ((0, None),)) -> torch.Tensor:
        """``x: (B, C, D, H, W)``; ``groups`` from ``domain_groups``."""
        if self.training:
            self.num_batches_tracked.add_(1)

        def norm(part: torch.Tensor, domain: int) -> torch.Tensor:
            mean, var = self.stats(domain)
            return F.batch_norm(part, mean, var, self.weight, self.bias, self.training, self.momentum, self.eps)

        if len(groups) == 1:
            return norm(x, groups[0][0])
        out = torch.empty_like(x)
        for domain, index in groups:
            out[index] = norm(x[index], domain)
        return out


class LUConv(nn.Module):
    """Conv3d(k=3, pad=1) -> DomainBatchNorm3d -> ReLU. ``x: (B, in_ch, D, H, W) -> (B, out_ch, D, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int, norm_domains: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn1 = DomainBatchNorm3d(out_ch, norm_domains)

    def forward(self, x: torch.Tensor, groups: Groups = ((0, None),)) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x), groups), inplace=True)


class TwoConvs(nn.ModuleList):
    """Two LUConvs in a row (a list, so the keys stay ``ops.0.*``/``ops.1.*`` as the reference's)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, norm_domains: int = 1) -> None:
        super().__init__([LUConv(in_ch, mid_ch, norm_domains), LUConv(mid_ch, out_ch, norm_domains)])

    def forward(self, x: torch.Tensor, groups: Groups = ((0, None),)) -> torch.Tensor:
        for conv in self:
            x = conv(x, groups)
        return x


class DownTransition(nn.Module):
    """Two LUConvs then (optionally) 2x max-pool; returns ``(pooled_or_same, pre_pool)``."""

    def __init__(self, in_ch: int, depth: int, pool: bool, base: int = 32, norm_domains: int = 1) -> None:
        super().__init__()
        out_ch = 2 * base * 2**depth
        self.ops = TwoConvs(in_ch, out_ch // 2, out_ch, norm_domains)
        self.pool = pool

    def forward(self, x: torch.Tensor, groups: Groups = ((0, None),)) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x, groups)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class UpTransition(nn.Module):
    """Transposed conv (x2), concat ``[up, skip]``, two LUConvs.

    ``x: (B, in_ch, d, h, w)``, ``skip: (B, in_ch // 2, 2d, 2h, 2w)`` -> ``(B, out_ch, 2d, 2h, 2w)``.
    """

    def __init__(self, in_ch: int, out_ch: int, norm_domains: int = 1) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_ch, in_ch, kernel_size=2, stride=2)
        self.ops = TwoConvs(in_ch + in_ch // 2, out_ch, out_ch, norm_domains)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, groups: Groups = ((0, None),)) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1), groups)


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
        norm_domains: sets of BatchNorm running statistics (``DomainBatchNorm3d``); with more than one,
            ``forward_features``/``forward`` take each sample's domain id.

    Attributes:
        enc_channels: ``16 * base_channels`` (512), channels of ``enc_last``.
        dec_channels: ``2 * base_channels`` (64), channels of ``dec_last``.
    """

    size_divisor = 8  # three 2x poolings: every spatial size must be a multiple of this

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 32,
                 norm_domains: int = 1) -> None:
        super().__init__()
        b, n = base_channels, norm_domains
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm_domains = norm_domains
        self.enc_channels = 16 * b
        self.dec_channels = 2 * b
        self.down_tr64 = DownTransition(in_channels, 0, pool=True, base=b, norm_domains=n)
        self.down_tr128 = DownTransition(2 * b, 1, pool=True, base=b, norm_domains=n)
        self.down_tr256 = DownTransition(4 * b, 2, pool=True, base=b, norm_domains=n)
        self.down_tr512 = DownTransition(8 * b, 3, pool=False, base=b, norm_domains=n)
        self.up_tr256 = UpTransition(16 * b, 8 * b, n)
        self.up_tr128 = UpTransition(8 * b, 4 * b, n)
        self.up_tr64 = UpTransition(4 * b, 2 * b, n)
        self.out_tr = OutputTransition(2 * b, out_channels) if out_channels is not None else None

    def forward_features(self, x: torch.Tensor, domain: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, C_in, D, H, W)``, D, H, W divisible by 8; ``domain: (B,)`` ids in ``[0, norm_domains)``
        (None: domain 0 for every sample).

        Returns ``(enc_last, dec_last)``: ``(B, 512, D/8, H/8, W/8)`` and ``(B, 64, D, H, W)`` (at the
        default width).
        """
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise ValueError(f"UNet3D needs spatial sizes divisible by {self.size_divisor}, got {tuple(x.shape[2:])}")
        if domain is None and self.norm_domains > 1:
            raise ValueError(f"this UNet3D keeps {self.norm_domains} sets of normalisation statistics: pass each "
                             "sample's domain id")
        groups = domain_groups(domain, x.shape[0])
        x, skip64 = self.down_tr64(x, groups)
        x, skip128 = self.down_tr128(x, groups)
        x, skip256 = self.down_tr256(x, groups)
        enc_last, _ = self.down_tr512(x, groups)
        x = self.up_tr256(enc_last, skip256, groups)
        x = self.up_tr128(x, skip128, groups)
        dec_last = self.up_tr64(x, skip64, groups)
        return enc_last, dec_last

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        """``x: (B, C_in, D, H, W)``, ``domain: (B,)`` or None -> logits ``(B, out_channels, D, H, W)``
        (no activation)."""
        if self.out_tr is None:
            raise RuntimeError("UNet3D was built with out_channels=None; use forward_features() or set out_channels")
        return self.out_tr(self.forward_features(x, domain)[1])
