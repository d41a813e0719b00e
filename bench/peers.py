"""Build our networks and their peers with the same weights (MONAI is imported only here and in tests).

Contenders: our ``MulModSeg`` (batched head), MONAI's ``SwinUNETR`` + the reference's per-sample head
(``bench/reference_head.py``), MONAI's vision-only ``SwinUNETR``, and for UNet (no MONAI network of
that architecture) our ``UNet3D`` backbone + the reference head.
"""
from __future__ import annotations

import inspect

import torch
from reference_head import MonaiSwinFeatures, ReferenceHeadModel
from torch import nn

from mulmodseg.model import MulModSeg

MODALITIES = ("CT", "MR")


def monai_merge_order() -> str:
    """Our ``merge_order`` that equals the installed MONAI's default patch merging."""
    import monai

    major, minor = (int(v) for v in monai.__version__.split(".")[:2])
    return "all8" if (major, minor) >= (1, 5) else "legacy"


def monai_swinunetr(feature_size: int, out_channels: int, size: int) -> nn.Module:
    """MONAI's SwinUNETR (its defaults otherwise); ``img_size`` only where the installed MONAI needs it."""
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    kwargs = dict(in_channels=1, out_channels=out_channels, feature_size=feature_size)
    if "img_size" in inspect.signature(MonaiSwinUNETR.__init__).parameters:
        kwargs["img_size"] = (size,) * 3
    return MonaiSwinUNETR(**kwargs)


class VisionOnly(nn.Module):
    """Adapts a plain network to the ``(x, modality)`` call of the MulModSeg models (modality ignored)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, modality=None) -> torch.Tensor:
        return self.net(x)


def _copy_head(ours: MulModSeg, ref: ReferenceHeadModel) -> None:
    head = {k: v for k, v in ours.state_dict().items() if not k.startswith("backbone.")}
    missing, unexpected = ref.load_state_dict(head, strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing), (missing, unexpected)


def swin_contenders(feature_size: int, size: int, seed: int = 0, vision_only: bool = True) -> dict[str, nn.Module]:
    """{"ours": MulModSeg-SwinUNETR, "monai+ref head": same weights, "monai vision-only": same backbone weights}."""
    torch.manual_seed(seed)
    table = torch.randn(len(MODALITIES), 14, 512)
    ours = MulModSeg("swinunetr", 14, embeddings=table, modalities=MODALITIES, feature_size=feature_size,
                     merge_order=monai_merge_order())
    backbone_state = ours.backbone.state_dict()
    net = monai_swinunetr(feature_size, 14, size)
    missing, unexpected = net.load_state_dict(backbone_state, strict=False)
    assert not unexpected and all(k.startswith("out.") for k in missing), (missing, unexpected)
    ref = ReferenceHeadModel(MonaiSwinFeatures(net), table, MODALITIES)
    _copy_head(ours, ref)
    out = {"ours MulModSeg-Swin": ours, "MONAI Swin + ref head": ref}
    if vision_only:
        plain = monai_swinunetr(feature_size, 14, size)
        plain.load_state_dict(net.state_dict())
        out["MONAI Swin vision-only"] = VisionOnly(plain)
    return out


def unet_contenders(base_channels: int = 32, seed: int = 0) -> dict[str, nn.Module]:
    """{"ours": MulModSeg-UNet, "our UNet + ref head": same weights}."""
    torch.manual_seed(seed)
    table = torch.randn(len(MODALITIES), 14, 512)
    ours = MulModSeg("unet", 14, embeddings=table, modalities=MODALITIES, base_channels=base_channels)
    backbone = MulModSeg("unet", 14, embeddings=table, modalities=MODALITIES, base_channels=base_channels).backbone
    backbone.load_state_dict(ours.backbone.state_dict())
    ref = ReferenceHeadModel(backbone, table, MODALITIES)
    _copy_head(ours, ref)
    return {"ours MulModSeg-UNet": ours, "our UNet + ref head": ref}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The window attention core as it was before the explicit matmul-softmax (q already scaled)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def with_sdpa_attention(model: nn.Module) -> nn.Module:
    """``model`` with every WindowAttention of ours computing its core with SDPA (the "before" variant)."""
    from mulmodseg.nets.swin_unetr import WindowAttention

    for module in model.modules():
        if isinstance(module, WindowAttention):
            module._attend = sdpa_attention
    return model
