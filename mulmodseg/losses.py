"""Segmentation losses: soft Dice plus cross-entropy on integer label maps.

The default is the MulModSeg training loss: soft Dice over a softmax of all K channels (background
included, one Dice per sample and class, then the mean) plus multi-class cross-entropy on the logits.
It equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``. The per-class sums are taken with
``gather``/``scatter_add`` on the label indices, so no float one-hot of the target is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """``lambda_dice * Dice + lambda_ce * CE`` for logits ``(B, K, *S)`` and an integer label map.

    ``activation="softmax"`` (default): Dice on ``softmax(logits)`` and multi-class cross-entropy.
    ``activation="sigmoid"``: the one-vs-all variant, Dice on ``sigmoid(logits)`` and binary
    cross-entropy of every channel against its one-hot target, averaged over all ``B*K*prod(S)``
    values (MONAI ``DiceLoss(sigmoid=True, to_onehot_y=True)`` + ``BCEWithLogitsLoss`` on the one-hot).
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        activation: str = "softmax",
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_dice={lambda_dice}, lambda_ce={lambda_ce}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.activation = activation

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted ``(dice, ce)`` scalars.

        logits: (B, K, *S) float. target: (B, 1, *S) or (B, *S), integer dtype or float holding
        integer values in [0, K).
        """
        batch, num_classes = logits.shape[:2]
        labels = _flat_labels(target, logits.shape)  # (B, N) int64
        flat = logits.reshape(batch, num_classes, -1)  # (B, K, N)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # sums over a whole crop need more digits than half precision has
        probs = torch.softmax(flat, 1) if self.activation == "softmax" else torch.sigmoid(flat)

        # Per sample and class: the probability mass on that class's voxels and the voxel count. The
        # scatter adds one value at a time, so it accumulates in float64 to stay as accurate as a pairwise sum.
        prob_on_label = probs.gather(1, labels[:, None]).squeeze(1)  # (B, N)
        intersection = torch.zeros(batch, num_classes, dtype=torch.float64, device=flat.device)
        intersection = intersection.scatter_add(1, labels, prob_on_label.double())
        sample_offset = torch.arange(batch, device=flat.device)[:, None] * num_classes
        label_count = torch.bincount((labels + sample_offset).reshape(-1), minlength=batch * num_classes)
        denominator = label_count.reshape(batch, num_classes) + probs.sum(2).double()
        dice_per_item = 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        dice = dice_per_item.mean().to(flat.dtype)

        if self.activation == "softmax":
            ce = F.cross_entropy(flat, labels)
        else:
            # BCE with one-hot y: sum(softplus(x) - x*y) / numel; x*y is non-zero only at the label channel.
            ce = (F.softplus(flat).sum() - flat.gather(1, labels[:, None]).sum()) / flat.numel()
        return dice, ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted sum as a scalar. logits: (B, K, *S); target: (B, 1, *S) or (B, *S)."""
        dice, ce = self.terms(logits, target)
        return self.lambda_dice * dice + self.lambda_ce * ce


def _flat_labels(target: torch.Tensor, logits_shape: torch.Size) -> torch.Tensor:
    """target (B, 1, *S) or (B, *S) -> (B, N) int64 on the same device, shape-checked against logits."""
    spatial = tuple(logits_shape[2:])
    if target.dim() == len(logits_shape) and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (logits_shape[0], *spatial):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits_shape)}")
    return target.reshape(target.shape[0], -1).long()
