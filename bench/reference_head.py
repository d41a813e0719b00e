"""The reference's per-sample dynamic head, re-implemented for benchmarking.

The reference MulModSeg (ChengyinLee/MulModSeg_2024) runs its head in a Python loop over the batch:
for each sample it builds the controller input for all K classes, maps the 48/64-channel decoder
output to 8 channels, repeats that map K times along channels, and runs three grouped 1x1x1
convolutions (groups=K) with the generated weights. ``ReferenceHeadModel`` does exactly that, with
the same parameter names as ``mulmodseg.model.MulModSeg`` so one state dict drives both; the
backbone is any module with ``forward_features(x) -> (enc_last, dec_last)``. ``MonaiSwinFeatures``
gives MONAI's ``SwinUNETR`` that interface (the reference's own backbone is MONAI's network without
its output conv).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mulmodseg.model import HEAD_CHANNELS, NUM_DYNAMIC_PARAMS, PARAM_SPLITS, group_norm


class MonaiSwinFeatures(nn.Module):
    """MONAI ``SwinUNETR`` as a backbone returning ``(enc_last, dec_last)``: (B, 16F, /32), (B, F, full)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.enc_channels = net.encoder10.layer.conv1.conv.out_channels
        self.dec_channels = net.decoder1.conv_block.conv1.conv.out_channels

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        hidden = n.swinViT(x, n.normalize)
        enc0 = n.encoder1(x)
        enc1 = n.encoder2(hidden[0])
        enc2 = n.encoder3(hidden[1])
        enc3 = n.encoder4(hidden[2])
        dec4 = n.encoder10(hidden[4])
        dec3 = n.decoder5(dec4, hidden[3])
        dec2 = n.decoder4(dec3, enc3)
        dec1 = n.decoder3(dec2, enc2)
        dec0 = n.decoder2(dec1, enc1)
        return dec4, n.decoder1(dec0, enc0)


class ReferenceHeadModel(nn.Module):
    """Backbone + the reference's per-sample head. ``forward(x: (B, 1, D, H, W), modality: str) -> (B, K, D, H, W)``.

    ``table``: (M, K, 512) text embeddings, rows named by ``modalities``; one modality per batch, as
    in the reference. Head parameter names equal MulModSeg's (GAP, precls_conv, controller,
    text_to_vision), so ``load_state_dict(mulmodseg_model.state_dict())`` copies the same weights.
    """

    def __init__(self, backbone: nn.Module, table: torch.Tensor, modalities: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.modalities = tuple(modalities)
        self.num_classes = table.shape[1]
        c_enc, c_dec = backbone.enc_channels, backbone.dec_channels
        self.precls_conv = nn.Sequential(group_norm(c_dec), nn.ReLU(inplace=True), nn.Conv3d(c_dec, HEAD_CHANNELS, 1))
        self.GAP = nn.Sequential(group_norm(c_enc), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1),
                                 nn.Conv3d(c_enc, 256, 1))
        self.text_to_vision = nn.Linear(table.shape[-1], 256)
        self.controller = nn.Conv3d(512, NUM_DYNAMIC_PARAMS, 1)
        self.register_buffer("text_embeddings", table.clone())

    def _grouped_mlp(self, feat: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """feat: (1, 8K, *S) (the 8-channel map repeated K times); params: (K, 153) -> (1, K, *S)."""
        k, c = self.num_classes, HEAD_CHANNELS
        w1, w2, w3, b1, b2, b3 = torch.split(params, PARAM_SPLITS, dim=1)
        layers = [(w1.reshape(k * c, c, 1, 1, 1), b1.reshape(k * c)),
                  (w2.reshape(k * c, c, 1, 1, 1), b2.reshape(k * c)),
                  (w3.reshape(k, c, 1, 1, 1), b3.reshape(k))]
        x = feat
        for i, (w, b) in enumerate(layers):
            x = F.conv3d(x, w, b, groups=k)
            if i < len(layers) - 1:
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        enc_last, dec_last = self.backbone.forward_features(x)
        image_code = self.GAP(enc_last)  # (B, 256, 1, 1, 1)
        row = self.text_embeddings[self.modalities.index(modality)]
        task = F.relu(self.text_to_vision(row))[:, :, None, None, None]  # (K, 256, 1, 1, 1)
        outs = []
        for i in range(x.shape[0]):
            cond = torch.cat([image_code[i:i + 1].repeat(self.num_classes, 1, 1, 1, 1), task], dim=1)
            params = self.controller(cond).flatten(1)  # (K, 153)
            feat = self.precls_conv(dec_last[i:i + 1])  # (1, 8, *S)
            outs.append(self._grouped_mlp(feat.repeat(1, self.num_classes, 1, 1, 1), params))
        return torch.cat(outs)
