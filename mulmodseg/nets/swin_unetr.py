"""SwinUNETR (v1) backbone, numerically and state-dict compatible with MONAI's ``SwinUNETR``.

Same computation as MONAI's ``SwinUNETR(in_channels, out_channels, feature_size=48)`` with its defaults
(patch size 2, window 7, depths (2, 2, 2, 2), heads (3, 6, 12, 24), ``normalize=True``, legacy
``"merging"`` downsampling, instance-norm residual UNETR blocks, no dropout), with the same parameter
and buffer names, so MONAI checkpoints load with ``load_state_dict`` in both directions.
``load_swin_weights`` additionally reads checkpoints that wrap or prefix the keys, such as the public
self-supervised Swin encoder weights.

Shapes for an input ``x: (B, C_in, D, H, W)`` (each of D, H, W divisible by 32), F = feature_size:

* ``swinViT`` hidden states: F @ 1/2, 2F @ 1/4, 4F @ 1/8, 8F @ 1/16, 16F @ 1/32, each layer-normalised
  over channels (``normalize=True``).
* ``enc_last = encoder10(hidden[4])``: ``(B, 16F, D/32, H/32, W/32)``.
* ``dec_last = decoder1(...)``: ``(B, F, D, H, W)``; ``out`` maps it to class logits.

Faithfully kept MONAI behaviours (they change numbers, so checkpoints depend on them):

* Legacy patch merging (MONAI < 1.5, the version the MulModSeg reference and the 2022 self-supervised
  Swin weights were trained with) concatenates the 2x2x2 sub-voxels in the order 000, 100, 010, 001, 101, 010, 001, 111
  (d, h, w offsets): 010 and 001 twice, 110 and 011 never. MONAI >= 1.5 uses all eight
  (000, 100, 010, 001, 110, 101, 011, 111); choose it with ``merge_order="all8"``.
* Windows are padded with zero tokens after ``norm1``; the padded tokens take part in attention
  (only the shift mask, value -100, separates the rolled regions).
* Where a stage is not larger than the window, the window shrinks to the stage size, the shift is
  dropped in that dimension, and the relative position index is the top-left ``[:n, :n]`` corner of
  the full 343 x 343 index (not the index of the smaller window).

One deliberate difference: where the 1/32 level is a single voxel (a 32-voxel input side in all three
dimensions), MONAI's instance norm raises; here it returns its exact limit, 0 (see ``instance_norm``),
so 32^3 inputs work, but then ``encoder10``'s convs get no gradient.

Speed: shift+pad+window-partition (and the inverse) are one cached gather each, the windows are
ordered so that windows sharing a shift-mask pattern are contiguous, and each group runs one
attention (SDPA on GPU, matmul-softmax-matmul on CPU) with a broadcast ``(heads, n, n)`` additive
bias+mask, so the ``(windows, heads, n, n)`` bias+mask tensor of the straightforward form is never built.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Sub-voxel (d, h, w) offsets concatenated by patch merging, in channel order.
MERGE_ORDERS = {
    "legacy": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)),
    "all8": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
}
SHIFT_MASK_VALUE = -100.0  # MONAI's value; exp(-100) is not exactly 0, so -inf would change numbers
_MAX_CACHED_PLANS = 16


def _conv_unit(conv: nn.Module) -> nn.Sequential:
    """Wrap a conv as ``<name>.conv`` so parameter names match MONAI's ``Convolution`` blocks."""
    return nn.Sequential(OrderedDict(conv=conv))


def instance_norm(x: torch.Tensor) -> torch.Tensor:
    """Instance norm without affine (eps 1e-5). ``x: (B, C, D, H, W)``.

    With a single voxel per channel (the 1/32 level of a 32^3 input) the exact result is 0;
    ``F.instance_norm`` (and so MONAI) raises there instead, which would rule out 32^3 inputs.
    """
    if x.shape[2:].numel() == 1:
        return torch.zeros_like(x)
    return F.instance_norm(x)


class ResBlock(nn.Module):
    """MONAI ``UnetResBlock`` (instance norm, LeakyReLU 0.01, bias-free convs).

    ``x: (B, in_ch, D, H, W) -> (B, out_ch, D, H, W)``; a 1x1x1 conv matches channels on the skip path.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = _conv_unit(nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False))
        self.conv2 = _conv_unit(nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False))
        self.conv3 = _conv_unit(nn.Conv3d(in_ch, out_ch, 1, bias=False)) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(instance_norm(self.conv1(x)), 0.01, inplace=True)
        out = instance_norm(self.conv2(out))
        residual = instance_norm(self.conv3(x)) if self.conv3 is not None else x
        return F.leaky_relu(out + residual, 0.01, inplace=True)


class EncoderBlock(nn.Module):
    """MONAI ``UnetrBasicBlock`` with ``res_block=True``: one ``ResBlock`` named ``layer``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.layer = ResBlock(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class DecoderBlock(nn.Module):
    """MONAI ``UnetrUpBlock``: 2x transposed conv, concat ``[up, skip]``, ``ResBlock``.

    ``x: (B, in_ch, d, h, w)``, ``skip: (B, out_ch, 2d, 2h, 2w)`` -> ``(B, out_ch, 2d, 2h, 2w)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.transp_conv = _conv_unit(nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2, bias=False))
        self.conv_block = ResBlock(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class OutBlock(nn.Module):
    """MONAI ``UnetOutBlock``: 1x1x1 conv with bias to logits (no activation)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = _conv_unit(nn.Conv3d(in_ch, out_ch, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PatchEmbed(nn.Module):
    """Non-overlapping 2x2x2 patches to tokens: ``(B, C_in, D, H, W) -> (B, F, D/2, H/2, W/2)``."""

    def __init__(self, in_ch: int, embed_dim: int, patch_size: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_ch, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear, names as MONAI's ``MLPBlock``. ``(..., C) -> (..., C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """Index into the relative-position bias table for each token pair of a window.

    Returns ``(n, n)`` int64 with ``n = prod(window)``; entry ``[i, j]`` encodes ``coord_i - coord_j``.
    """
    wd, wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij"))
    coords = coords.flatten(1)  # (3, n)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor([wd - 1, wh - 1, ww - 1])[:, None, None]
    return rel[0] * (2 * wh - 1) * (2 * ww - 1) + rel[1] * (2 * ww - 1) + rel[2]


class WindowPlan(NamedTuple):
    """Cached index maps for one (grid size, window, shift, batch, device); see ``build_window_plan``.

    ``gather``: (W * n,) rows of the flat tokens ``(B * L, C)`` (plus one zero row at ``B * L`` when
    ``pad_row``) in window order; ``scatter``: (B * L,) rows of the windowed tokens back to the grid;
    ``groups``: ``(first, end, shift mask (n, n) or None)`` window ranges sharing a mask;
    ``n``: tokens per window. Windows are ordered group-major, then by sample, then by position.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    pad_row: bool
    groups: list[tuple[int, int, torch.Tensor | None]]
    n: int


def effective_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI's rule: a dimension not larger than the window uses its size as window and no shift."""
    win = tuple(s if s <= w else w for s, w in zip(size, window))
    sh = tuple(0 if s <= w else t for s, w, t in zip(size, window, shift))
    return win, sh


def build_window_plan(size: Sequence[int], window: Sequence[int], shift: Sequence[int], batch: int,
                      device: torch.device) -> WindowPlan:
    """Index maps for cyclic shift + zero padding + window partition of ``batch`` grids of ``size``.

    ``window``/``shift`` must already be effective (see ``effective_window``). Windows are grouped by
    their shift-mask pattern (whether they hold the rolled border along each shifted dimension), so
    the windows of a group share one ``(n, n)`` mask; the interior group comes first and has none.
    """
    padded = [math.ceil(s / w) * w for s, w in zip(size, window)]
    counts = [p // w for p, w in zip(padded, window)]
    src, label, border = [], [], []
    for s, w, t, p, c in zip(size, window, shift, padded, counts):
        g = torch.arange(p).view(c, w)  # rolled-frame coordinate as (window index, position in window)
        src.append((g + t) % p)
        # Regions of the rolled grid are [0, p-w), [p-w, p-t), [p-t, p); without a shift, just one.
        label.append((g >= p - w).long() + (g >= p - t).long() if t > 0 else torch.zeros_like(g))
        border.append(((torch.arange(c) == c - 1) & (t > 0)).long())
    n = window[0] * window[1] * window[2]

    def windows_major(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # per-dimension (count, window) arrays -> (cd*ch*cw, wd*wh*ww) combined as a*f0 + b*f1 + c
        full = a[:, None, None, :, None, None] + b[None, :, None, None, :, None] + c[None, None, :, None, None, :]
        return full.reshape(-1, n)

    sd, sh, sw = src
    length = size[0] * size[1] * size[2]
    flat = windows_major(sd * size[1] * size[2], sh * size[2], sw)
    valid = windows_major((sd >= size[0]).long(), (sh >= size[1]).long(), (sw >= size[2]).long()) == 0
    labels = windows_major(label[0] * 9, label[1] * 3, label[2])
    bd, bh, bw = border
    pattern = (bd[:, None, None] * 4 + bh[None, :, None] * 2 + bw[None, None, :]).reshape(-1)  # (nW,)
    order = torch.sort(pattern, stable=True).indices
    rows = torch.where(valid, flat, -1)[order]  # (nW, n) in grouped order; -1 marks padding
    keys, sizes = torch.unique_consecutive(pattern[order], return_counts=True)
    samples = torch.arange(batch)[:, None, None] * length
    gather_parts, groups = [], []
    start = 0
    for key, count in zip(keys.tolist(), sizes.tolist()):
        part = rows[start:start + count]
        gather_parts.append(torch.where(part >= 0, part + samples, batch * length).reshape(-1))
        mask = None
        if key != 0:
            lab = labels[order[start]]
            mask = ((lab[:, None] != lab[None, :]).float() * SHIFT_MASK_VALUE).to(device)
        groups.append((batch * start, batch * (start + count), mask))
        start += count
    gather = torch.cat(gather_parts)
    keep = gather < batch * length
    scatter = torch.empty(batch * length, dtype=torch.long)
    scatter[gather[keep]] = torch.arange(gather.numel())[keep]
    return WindowPlan(gather.to(device), scatter.to(device), bool((~keep).any()), groups, n)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Parameter/buffer names as MONAI: ``relative_position_bias_table`` ((2w-1)^3, heads),
    ``relative_position_index`` (w^3, w^3), ``qkv``, ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(size, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention ``(w, heads, n, d)`` with an additive ``(heads, n, n)`` mask, q already scaled.

        On CPU this is written out rather than ``scaled_dot_product_attention``: with a float mask
        that needs a gradient (the bias table's), SDPA on CPU takes its math path, which adds a "safe
        softmax" (isneginf/all/where over every score) and is slower forward and backward
        (bench/RESULTS.md). On GPU, SDPA's fused kernels avoid materialising the scores, so it stays.
        """
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores.add_(mask)  # in place: the add's backward needs neither operand
        return torch.matmul(scores.softmax(-1), v)

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """``x: (W, n, C)`` windows ordered as ``plan.groups`` -> ``(W, n, C)``."""
        w, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(w, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        # Gathered every call (cheap) so the table gets gradients; [:n, :n] is MONAI's shrunk-window rule.
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, heads).permute(2, 0, 1)
        # split/cat rather than slicing/slice-assignment: their backward is one cat/view, not a
        # full-size zero-fill and accumulation per group
        sizes = [end - start for start, end, _ in plan.groups]
        masks = [(bias if mask is None else bias + mask).to(q.dtype) for _, _, mask in plan.groups]
        q = q * (c // heads) ** -0.5
        outs = [self._attend(qg, kg, vg, m)
                for qg, kg, vg, m in zip(q.split(sizes), k.split(sizes), v.split(sizes), masks)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj(out.transpose(1, 2).reshape(w, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block + MLP on flat tokens ``(B * L, C)``."""

    def __init__(self, dim: int, num_heads: int, window: Sequence[int], mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attention(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        h = self.norm1(x)
        if plan.pad_row:  # padding is applied after norm1, as in MONAI: padded tokens are exact zeros
            h = torch.cat((h, h.new_zeros(1, h.shape[1])))
        windows = h.index_select(0, plan.gather).view(-1, plan.n, h.shape[1])
        return self.attn(windows, plan).view(-1, h.shape[1]).index_select(0, plan.scatter)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """``x: (B * L, C)`` tokens of ``B`` grids in (d, h, w) row-major order -> same shape."""
        if self.use_checkpoint and torch.is_grad_enabled():
            x = x + checkpoint(self._attention, x, plan, use_reentrant=False)
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        x = x + self._attention(x, plan)
        return x + self._mlp(x)


class PatchMerging(nn.Module):
    """2x2x2 token merging: concat 8 sub-voxels (order ``MERGE_ORDERS[merge_order]``), LayerNorm, Linear.

    ``x: (B, D, H, W, C) -> (B, D/2, H/2, W/2, 2C)`` (channels last; D, H, W even).
    """

    def __init__(self, dim: int, merge_order: str = "legacy") -> None:
        super().__init__()
        if merge_order not in MERGE_ORDERS:
            raise ValueError(f"merge_order must be one of {sorted(MERGE_ORDERS)}, got {merge_order!r}")
        self.offsets = MERGE_ORDERS[merge_order]
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.offsets], dim=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks (odd ones shifted by window // 2) then patch merging.

    ``x: (B, D, H, W, C) -> (B, D/2, H/2, W/2, 2C)`` (channels last).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: Sequence[int], mlp_ratio: float,
                 qkv_bias: bool, use_checkpoint: bool, merge_order: str) -> None:
        super().__init__()
        self.window = tuple(window)
        self.blocks = nn.ModuleList(
            [SwinBlock(dim, num_heads, window, mlp_ratio, qkv_bias, use_checkpoint) for _ in range(depth)])
        self.downsample = PatchMerging(dim, merge_order)
        # Index maps and shift masks depend only on the input geometry; not part of the state dict.
        self._plans: dict[Any, WindowPlan] = {}

    # torch.compile: the plan is a constant of the input geometry (which the graph's shape guards pin),
    # so dynamo calls this at trace time and bakes the result in, instead of tracing the data-dependent
    # index building (34 graph breaks) and recompiling once the cache is filled.
    @torch.compiler.assume_constant_result
    def _plan(self, size: tuple[int, int, int], shifted: bool, batch: int, device: torch.device) -> WindowPlan:
        key = (size, shifted, batch, device)
        if key not in self._plans:
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.clear()
            shift = tuple(w // 2 for w in self.window) if shifted else (0, 0, 0)
            window, shift = effective_window(size, self.window, shift)
            self._plans[key] = build_window_plan(size, window, shift, batch, device)
        return self._plans[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        tokens = x.reshape(-1, c)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, self._plan((d, h, w), i % 2 == 1, b, x.device))
        return self.downsample(tokens.view(b, d, h, w, c))


class SwinTransformer(nn.Module):
    """Swin encoder (MONAI's ``swinViT``): patch embedding then four stages ``layers1``..``layers4``."""

    def __init__(self, in_channels: int, embed_dim: int, window: Sequence[int], depths: Sequence[int],
                 num_heads: Sequence[int], mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_checkpoint: bool = False, merge_order: str = "legacy") -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, embed_dim)
        for i in range(4):
            self.add_module(f"layers{i + 1}", nn.ModuleList([BasicLayer(
                embed_dim * 2**i, depths[i], num_heads[i], window, mlp_ratio, qkv_bias, use_checkpoint,
                merge_order)]))

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """``x: (B, C_in, D, H, W)`` -> five ``(B, F * 2^i, D / 2^(i+1), ...)`` maps, i = 0..4."""
        x = self.patch_embed(x).permute(0, 2, 3, 4, 1).contiguous()  # channels last for the stages
        outs = [self._out(x, normalize)]
        for layer in (self.layers1, self.layers2, self.layers3, self.layers4):
            x = layer[0](x)
            outs.append(self._out(x, normalize))
        return outs

    @staticmethod
    def _out(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        if normalize:
            x = F.layer_norm(x, x.shape[-1:])
        return x.permute(0, 4, 1, 2, 3).contiguous()


class SwinUNETR(nn.Module):
    """SwinUNETR v1 (MONAI-compatible); 62,187,296 parameters for 1 -> 14 classes, feature_size 48.

    Args:
        in_channels: image channels C_in.
        out_channels: classes of the 1x1x1 output conv ``out``; ``None`` builds the backbone only
            (then ``forward`` raises).
        feature_size: F, channels after patch embedding; stage i has F * 2^i channels.
        depths, num_heads: blocks and attention heads per stage.
        window_size: attention window (cubic).
        use_checkpoint: gradient checkpointing of each block's attention and MLP parts.
        normalize: layer-normalise the Swin hidden states before the UNETR convs (MONAI default).
        merge_order: ``"legacy"`` (MONAI < 1.5, reference and public weights) or ``"all8"`` (MONAI >= 1.5).

    Attributes:
        enc_channels: 16 F, channels of ``enc_last``. dec_channels: F, channels of ``dec_last``.
    """

    size_divisor = 32  # patch embedding (2x) and four patch mergings: sizes must be multiples of this

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, feature_size: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, use_checkpoint: bool = False, normalize: bool = True,
                 merge_order: str = "legacy", mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"depths and num_heads need 4 stages, got {depths} and {num_heads}")
        for i, heads in enumerate(num_heads):
            if (feature_size * 2**i) % heads:
                raise ValueError(f"stage {i} width {feature_size * 2**i} is not divisible by {heads} heads")
        fs = feature_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.normalize = normalize
        self.enc_channels = 16 * fs
        self.dec_channels = fs
        self.swinViT = SwinTransformer(in_channels, fs, (window_size,) * 3, depths, num_heads, mlp_ratio,
                                       qkv_bias, use_checkpoint, merge_order)
        self.encoder1 = EncoderBlock(in_channels, fs)
        self.encoder2 = EncoderBlock(fs, fs)
        self.encoder3 = EncoderBlock(2 * fs, 2 * fs)
        self.encoder4 = EncoderBlock(4 * fs, 4 * fs)
        self.encoder10 = EncoderBlock(16 * fs, 16 * fs)
        self.decoder5 = DecoderBlock(16 * fs, 8 * fs)
        self.decoder4 = DecoderBlock(8 * fs, 4 * fs)
        self.decoder3 = DecoderBlock(4 * fs, 2 * fs)
        self.decoder2 = DecoderBlock(2 * fs, fs)
        self.decoder1 = DecoderBlock(fs, fs)
        self.out = OutBlock(fs, out_channels) if out_channels is not None else None

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, C_in, D, H, W)``, D, H, W divisible by 32.

        Returns ``(enc_last, dec_last)``: ``(B, 16F, D/32, H/32, W/32)`` and ``(B, F, D, H, W)``.
        """
        bad = [f"{name}={s}" for name, s in zip("DHW", x.shape[2:]) if s % self.size_divisor]
        if x.dim() != 5 or bad:
            raise ValueError(f"SwinUNETR needs (B, C, D, H, W) with D, H, W divisible by {self.size_divisor}; "
                             f"got shape {tuple(x.shape)} ({', '.join(bad) or 'not 5-D'})")
        hidden = self.swinViT(x, self.normalize)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        enc_last = self.encoder10(hidden[4])
        dec = self.decoder5(enc_last, hidden[3])
        dec = self.decoder4(dec, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return enc_last, self.decoder1(dec, enc0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C_in, D, H, W)`` -> logits ``(B, out_channels, D, H, W)`` (no activation)."""
        if self.out is None:
            raise RuntimeError("SwinUNETR was built with out_channels=None; use forward_features() or set out_channels")
        return self.out(self.forward_features(x)[1])


class LoadResult(NamedTuple):
    """Outcome of ``load_swin_weights``: model keys not filled, and checkpoint keys not used."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# Key renames from the self-supervised Swin checkpoints (research-contributions) to MONAI's names.
_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
_ENCODER_PREFIXES = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")


def _unwrap(checkpoint_obj: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("state_dict", "model", "net"):
        if isinstance(checkpoint_obj.get(key), Mapping):
            return _unwrap(checkpoint_obj[key])
    return checkpoint_obj


def load_swin_weights(model: SwinUNETR, state_dict_or_path: str | Mapping[str, Any],
                      strict: bool = False) -> LoadResult:
    """Load MONAI-style SwinUNETR / Swin-encoder weights into ``model``.

    Accepts a path (``torch.load``-ed on CPU) or a mapping. The state dict may be nested under
    ``"state_dict"``, ``"model"`` or ``"net"``; keys may carry a ``module.`` prefix (DataParallel);
    bare encoder keys (``patch_embed.*``, ``layers1.*`` ... as in the public self-supervised
    ``model_swinvit.pt``) are mapped to ``swinViT.*`` and ``mlp.fc1/fc2`` to ``mlp.linear1/linear2``.
    Keys of matching name but different shape raise ``ValueError``. With ``strict=True`` any missing or
    unexpected key raises ``ValueError``; otherwise both lists are returned for the caller to report.
    """
    if isinstance(state_dict_or_path, (str, bytes)) or hasattr(state_dict_or_path, "__fspath__"):
        state_dict_or_path = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    source = _unwrap(state_dict_or_path)
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        new = key[len("module."):] if key.startswith("module.") else key
        if new.startswith(_ENCODER_PREFIXES):
            new = "swinViT." + new
        for old, rep in _RENAMES:
            new = new.replace(old, rep)
        if new in own:
            mapped[new] = value
        else:
            unexpected.append(key)
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError("shape mismatch in " + str(len(wrong)) + " keys:\n  " + "\n  ".join(wrong))
    missing = [k for k in own if k not in mapped]
    if strict and (missing or unexpected):
        raise ValueError(f"load_swin_weights(strict=True): {len(missing)} missing keys {missing[:10]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:10]}")
    model.load_state_dict(mapped, strict=False)
    return LoadResult(missing, unexpected)
