"""Vision backbones: ``UNet3D`` and ``SwinUNETR``, and ``build_backbone`` to pick one by name.

Both expose ``enc_channels``/``dec_channels``, ``forward_features(x) -> (enc_last, dec_last)`` and
``forward(x) -> logits`` (when built with ``out_channels``).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .swin_unetr import SwinUNETR, load_swin_weights
from .unet3d import UNet3D

BACKBONES = {"unet": UNet3D, "swinunetr": SwinUNETR}


def build_backbone(name: str, in_channels: int = 1, out_channels: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the backbone ``name`` ("unet" or "swinunetr"); ``kwargs`` go to its constructor."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels=in_channels, out_channels=out_channels, **kwargs)


__all__ = ["UNet3D", "SwinUNETR", "load_swin_weights", "build_backbone", "BACKBONES"]
