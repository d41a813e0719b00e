"""MulModSeg: a U-shaped backbone plus a modality-conditioned, text-driven dynamic head.

For a batch of scans x with modalities m_b and a stored embedding table E (M modalities x K classes x D):

    e_vis[b]     = GAP(enc_last[b])                                  (256,)
    t[b, k]      = ReLU(text_to_vision(E[m_b, k]))                   (256,)
    theta[b, k]  = controller([e_vis[b]; t[b, k]])                   (153,) = W1 8x8, W2 8x8, W3 1x8, b1 8, b2 8, b3 1
    f[b]         = precls_conv(dec_last[b])                          (8, *S)
    logit[b, k]  = W3 ReLU(W2 ReLU(W1 f[b] + b1) + b2) + b3           (*S)

The reference (ChengyinLee/MulModSeg_2024) loops over samples and runs one 14-group conv per sample on
the 8-channel map repeated 14 times. Here the whole batch and all classes run as three batched
matrix products, with f shared by all classes instead of repeated, so the head stores
2 x B x K x 8 x S activations for backward and nothing else of that size.

Modalities are names ("CT", "MR", ...) stored with the table; a batch may mix them (one name per
sample). With ``norm_stats="per_modality"`` the UNet keeps one set of BatchNorm running statistics per
modality (``nets.unet3d.DomainBatchNorm3d``), chosen by each sample's modality; SwinUNETR normalises with
InstanceNorm, which has no running statistics, so the setting changes nothing there. State-dict keys match
the reference (backbone.*, GAP.*, precls_conv.*, controller.*, text_to_vision.*); the table is the buffer
``text_embeddings`` in our modality order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mulmodseg.nets import build_backbone

HEAD_CHANNELS = 8
# Controller output: W1 (8x8), W2 (8x8), W3 (1x8), then b1 (8), b2 (8), b3 (1), in the reference's order.
PARAM_SPLITS = (64, 64, 8, 8, 8, 1)
NUM_DYNAMIC_PARAMS = sum(PARAM_SPLITS)  # 153

Modality = Union[str, Sequence[str]]
NORM_STATS = ("shared", "per_modality")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 16 groups as in the reference, or the largest divisor of 16 that fits ``channels``."""
    return nn.GroupNorm(math.gcd(16, channels), channels)


def dynamic_head(feat: torch.Tensor, params: torch.Tensor, chunk_voxels: int | None = None) -> torch.Tensor:
    """Apply each (sample, class) 8 -> 8 -> 8 -> 1 per-voxel MLP whose weights are ``params``.

    feat: (B, 8, *S) head features; params: (B, K, 153) controller output. Returns logits (B, K, *S).
    ``chunk_voxels`` bounds the hidden activations to B x K x 8 x chunk_voxels when no gradient is
    needed (inference); with autograd the whole volume runs at once because backward needs it.
    """
    B, C, *spatial = feat.shape
    K = params.shape[1]
    w1, w2, w3, b1, b2, b3 = torch.split(params, PARAM_SPLITS, dim=-1)
    w1 = w1.reshape(B, K * C, C)  # layer 1 reads the shared feature map: one bmm for all classes
    b1 = b1.reshape(B, K * C, 1)
    w2 = w2.reshape(B * K, C, C)
    b2 = b2.reshape(B * K, C, 1)
    w3 = w3.reshape(B * K, 1, C)
    b3 = b3.reshape(B * K, 1, 1)
    f = feat.reshape(B, C, -1)

    def mlp(f_part: torch.Tensor) -> torch.Tensor:
        n = f_part.shape[-1]
        h = torch.baddbmm(b1, w1, f_part).relu_().view(B * K, C, n)
        h = torch.baddbmm(b2, w2, h).relu_()
        return torch.baddbmm(b3, w3, h).view(B, K, n)

    n_vox = f.shape[-1]
    if chunk_voxels is None or torch.is_grad_enabled() or n_vox <= chunk_voxels:
        out = mlp(f)
    else:
        out = torch.cat([mlp(part) for part in f.split(chunk_voxels, dim=-1)], dim=-1)
    return out.view(B, K, *spatial)


def _as_table(embeddings: torch.Tensor, modalities: Sequence[str], num_classes: int) -> torch.Tensor:
    """``embeddings`` as a float32 table (M, K, D), checked against the ``modalities`` names and ``num_classes``."""
    table = torch.as_tensor(embeddings).detach().float()
    if table.dim() != 3:
        raise ValueError(f"embedding table must be (modalities, classes, dim), got shape {tuple(table.shape)}")
    if table.shape[0] != len(modalities):
        raise ValueError(f"embedding table has {table.shape[0]} modality rows but modalities={tuple(modalities)}")
    if table.shape[1] != num_classes:
        raise ValueError(f"embedding table has {table.shape[1]} classes but num_classes={num_classes}")
    return table


class MulModSeg(nn.Module):
    """The MulModSeg network: backbone + text-conditioned dynamic head, or the vision-only baseline.

    backbone: "unet", "swinunetr" or any module with ``forward_features``, ``enc_channels`` and
    ``dec_channels``. embeddings: None (vision-only: the backbone's own 1x1x1 output conv) or a tensor
    (M, K, D), row m the K class embeddings of modality m (``mulmodseg.text.prompts.model_table`` makes the
    three arguments from "onehot", a saved table or an ``EmbeddingTable``). modalities: the names of the
    table's rows, in order. classes: class names (optional, kept for checkpoints). norm_stats: "shared"
    (one set of UNet BatchNorm running statistics for all modalities) or "per_modality" (one set per
    modality, affine weights shared; parameters unchanged).
    Extra keyword arguments go to the backbone (e.g. ``feature_size``).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "unet",
        num_classes: int = 14,
        embeddings: torch.Tensor | None = None,
        modalities: Sequence[str] = ("CT", "MR"),
        classes: Sequence[str] | None = None,
        in_channels: int = 1,
        gradient_checkpointing: bool = False,
        norm_stats: str = "shared",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")
        if backbone == "unet" and norm_stats == "per_modality":
            backbone_kwargs["norm_domains"] = len(modalities)
        self.num_classes = num_classes
        self.backbone_name = backbone if isinstance(backbone, str) else type(backbone).__name__
        self.backbone_kwargs = dict(backbone_kwargs)
        self.in_channels = in_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.vision_only = embeddings is None
        self.modalities = tuple(modalities)
        self.classes = tuple(classes) if classes else None
        table = None if self.vision_only else _as_table(embeddings, modalities, num_classes)
        if isinstance(backbone, str):
            if backbone == "swinunetr":
                backbone_kwargs.setdefault("use_checkpoint", gradient_checkpointing)
            out_channels = num_classes if self.vision_only else None
            backbone = build_backbone(backbone, in_channels=in_channels, out_channels=out_channels, **backbone_kwargs)
        self.backbone = backbone
        if self.vision_only:
            return
        c_enc, c_dec = backbone.enc_channels, backbone.dec_channels
        self.precls_conv = nn.Sequential(group_norm(c_dec), nn.ReLU(inplace=True), nn.Conv3d(c_dec, HEAD_CHANNELS, 1))
        self.GAP = nn.Sequential(
            group_norm(c_enc), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1), nn.Conv3d(c_enc, 256, 1)
        )
        self.text_to_vision = nn.Linear(table.shape[-1], 256)
        # A 1x1x1 conv, not a Linear, so that reference checkpoints load with their key shapes.
        self.controller = nn.Conv3d(512, NUM_DYNAMIC_PARAMS, 1)
        self.register_buffer("text_embeddings", table)

    def set_gradient_checkpointing(self, enabled: bool) -> MulModSeg:
        """Recompute activations during backward instead of keeping them: the dynamic head and every
        backbone module with a ``use_checkpoint`` switch (SwinUNETR's blocks). The UNet's stages are
        not checkpointed: recomputing a BatchNorm in training would update its running statistics twice."""
        self.gradient_checkpointing = enabled
        for module in self.backbone.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enabled
        return self

    def modality_index(self, modality: Modality, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Row indices (B,) into the table (and the normalisation statistics) for one modality name or one
        name per sample, on ``device`` (default: the table's)."""
        names = [modality] * batch_size if isinstance(modality, str) else list(modality)
        if len(names) != batch_size:
            raise ValueError(f"got {len(names)} modality names for a batch of {batch_size}")
        unknown = sorted(set(names) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modality {unknown}; this model knows {list(self.modalities)}")
        index = [self.modalities.index(n) for n in names]
        return torch.tensor(index, device=device if device is not None else self.text_embeddings.device)

    def domain(self, modality: Modality | None, x: torch.Tensor) -> torch.Tensor | None:
        """Each sample's normalisation statistics (B,) for a backbone with one set per modality, else None."""
        if getattr(self.backbone, "norm_domains", 1) == 1:
            return None
        if modality is None:
            raise ValueError(f"this model normalises each modality with its own statistics: pass the batch's "
                             f"modality, one of {list(self.modalities)}")
        # On the CPU: the ids only select statistics (no copy from a GPU, and a meta-device model works).
        return self.modality_index(modality, x.shape[0], torch.device("cpu"))

    def forward_features(self, x: torch.Tensor, modality: Modality | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C_in, D, H, W) -> (enc_last, dec_last) of the backbone; ``modality`` (one name or one per
        sample) picks the normalisation statistics when the backbone keeps them per modality."""
        domain = self.domain(modality, x)
        return self.backbone.forward_features(x) if domain is None else self.backbone.forward_features(x, domain)

    def dynamic_params(self, enc_last: torch.Tensor, modality: Modality) -> torch.Tensor:
        """Controller output theta: (B, K, 153) from the image code and each class's text embedding."""
        B = enc_last.shape[0]
        e_vis = self.GAP(enc_last).flatten(1)  # (B, 256)
        text = F.relu(self.text_to_vision(self.text_embeddings))  # (M, K, 256): tiny, all rows at once
        text = text[self.modality_index(modality, B)]  # (B, K, 256)
        cond = torch.cat([e_vis[:, None].expand(-1, self.num_classes, -1), text], dim=-1)
        return F.linear(cond, self.controller.weight.flatten(1), self.controller.bias)

    def forward(
        self,
        x: torch.Tensor,
        modality: Modality | None = None,
        prompt_modality: Modality | None = None,
        chunk_voxels: int | None = 2**14,
    ) -> torch.Tensor:
        """x: (B, C_in, D, H, W), modality: one name or one per sample -> logits (B, K, D, H, W).

        ``prompt_modality`` overrides the rows used for the prompts (the paper's wrong-modality test),
        never the normalisation statistics, which follow the image's ``modality``; the vision-only model
        has no prompts and needs ``modality`` only for per-modality statistics. ``chunk_voxels`` bounds
        head memory at inference; the default of 2**14 voxels is small enough for the head's hidden
        activations (B x K x 8 x chunk_voxels) to stay in the CPU's cache, which is faster than larger chunks.
        """
        if self.vision_only:
            domain = self.domain(modality, x)
            return self.backbone(x) if domain is None else self.backbone(x, domain)
        if modality is None and prompt_modality is None:
            raise ValueError(f"MulModSeg needs the batch's modality, one of {list(self.modalities)}")
        enc_last, dec_last = self.forward_features(x, modality)
        prompts = prompt_modality if prompt_modality is not None else modality
        if torch.is_grad_enabled() or not torch.amp.is_autocast_available(x.device.type):  # e.g. "meta"
            return self.head(enc_last, dec_last, prompts, chunk_voxels)
        # Without gradients (inference) the head runs in fp32 even under autocast: bf16 logits flip the
        # voxels where two classes nearly tie, and the head is a small part of inference time (bf16 against
        # fp32 label agreement: the learn.py entries of bench/RESULTS.md). Training keeps the head in autocast,
        # where fp32 would make every step markedly slower.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(enc_last.float(), dec_last.float(), prompts, chunk_voxels)

    def head(self, enc_last: torch.Tensor, dec_last: torch.Tensor, modality: Modality,
             chunk_voxels: int | None = 2**14) -> torch.Tensor:
        """The text-driven dynamic head: enc_last (B, C_enc, ...) and dec_last (B, C_dec, D, H, W) of the
        backbone, the prompts' ``modality`` (one name or one per sample) -> logits (B, K, D, H, W)."""
        params = self.dynamic_params(enc_last, modality)
        feat = self.precls_conv(dec_last)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(dynamic_head, feat, params, use_reentrant=False)
        return dynamic_head(feat, params, chunk_voxels)

    def config(self) -> dict[str, Any]:
        """Everything ``MulModSeg.from_config`` needs to rebuild this network (the table comes from the state dict)."""
        text_dim = None if self.vision_only else int(self.text_embeddings.shape[-1])
        return {
            "backbone": self.backbone_name,
            "backbone_kwargs": self.backbone_kwargs,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "vision_only": self.vision_only,
            "text_dim": text_dim,
            "modalities": list(self.modalities),
            "classes": list(self.classes) if self.classes else None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MulModSeg:
        """Build an untrained network of the shape ``config`` describes; load its state dict after."""
        embeddings = None
        if not config["vision_only"]:
            embeddings = torch.zeros(len(config["modalities"]), config["num_classes"], config["text_dim"])
        return cls(
            config["backbone"],
            num_classes=config["num_classes"],
            embeddings=embeddings,
            modalities=config["modalities"],
            classes=config["classes"],
            in_channels=config["in_channels"],
            **config["backbone_kwargs"],
        )


def load_reference_checkpoint(
    checkpoint_or_path: str | Path | dict, backbone: str = "unet", modality: str | None = None, **backbone_kwargs: Any
) -> MulModSeg:
    """Build a MulModSeg from a checkpoint of the reference code (ChengyinLee/MulModSeg_2024).

    The reference saves ``{'net': state_dict, ...}`` with the buffer ``organ_embedding`` of shape
    (2, K, 512), row 0 = MR and row 1 = CT; test-time files hold one (K, 512) slice, so ``modality``
    must then name it. Keys may carry DataParallel's ``module.`` prefix. The UNet's BatchNorm running
    statistics load as they are; note that the reference normalised with batch statistics even in
    eval mode, so its eval outputs differ from ours (see ``mulmodseg.nets.unet3d``).
    """
    ckpt = checkpoint_or_path
    if not isinstance(ckpt, dict):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = ckpt.get("net", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    table = state.pop("organ_embedding").float()
    if table.dim() == 3:
        if table.shape[0] != 2:
            raise ValueError(f"reference organ_embedding has {table.shape[0]} rows; expected 2 (MR, CT)")
        table, modalities = table[[1, 0]], ("CT", "MR")
    else:
        if modality is None:
            raise ValueError("this reference checkpoint holds one modality's (K, 512) table: "
                             "pass modality='CT' or 'MR'")
        table, modalities = table[None], (modality,)
    model = MulModSeg(backbone, num_classes=table.shape[1], embeddings=table, modalities=modalities, **backbone_kwargs)
    state["text_embeddings"] = table
    model.load_state_dict(state, strict=True)
    return model
