"""Segmentation losses: soft Dice plus cross-entropy on integer label maps, for fully and partially labelled data.

The default is the MulModSeg training loss: soft Dice over a softmax of all K channels (background
included, one Dice per sample and class, then the mean) plus multi-class cross-entropy on the logits.
It equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``. The per-class sums are taken with
``gather``/``scatter_add`` on the label indices, so no float one-hot of the target is ever built.

Partially labelled data (a dataset that labels only some of the K classes, e.g. CHAOS MR: liver, kidneys,
spleen) passes ``labelled`` (B, K) bool, one row per sample: a 0 in such a label map means "background or a
class this dataset does not label". The softmax loss is then the marginal loss of Shi et al. (2021, "Marginal
loss and exclusion loss for partially supervised multi-organ segmentation"): the probabilities of a sample's
unlabelled classes are merged into its background before the cross-entropy and the Dice, and the Dice is the
mean over the (sample, class) pairs that are labelled (merged background included). The sigmoid loss masks
the unlabelled channels out of its BCE and Dice (the CLIP-driven Universal Model's way); a partially labelled
sample's background channel is masked too, since "none of the K classes" is unknown where an unlabelled organ
may be. A batch whose samples are all fully labelled takes the full-label path: exactly the loss without
``labelled``.
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

    def terms(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted ``(dice, ce)`` scalars.

        logits: (B, K, *S) float. target: (B, 1, *S) or (B, *S), integer dtype or float holding
        integer values in [0, K). labelled: None (every class labelled) or (B, K) bool, the classes each
        sample's dataset labels (column 0, background, is always taken as labelled); a target value must be
        0 or a labelled class.
        """
        batch, num_classes = logits.shape[:2]
        labels = _flat_labels(target, logits.shape)  # (B, N) int64
        flat = logits.reshape(batch, num_classes, -1)  # (B, K, N)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # sums over a whole crop need more digits than half precision has
        if labelled is not None:
            labelled = _labelled_mask(labelled, batch, num_classes, flat.device)
            if bool(labelled.all()):
                labelled = None
        if labelled is not None:
            return self._partial_terms(flat, labels, labelled)
        probs = torch.softmax(flat, 1) if self.activation == "softmax" else torch.sigmoid(flat)
        dice = self._dice_per_item(probs, labels).mean().to(flat.dtype)

        if self.activation == "softmax":
            ce = F.cross_entropy(flat, labels)
        else:
            # BCE with one-hot y: sum(softplus(x) - x*y) / numel; x*y is non-zero only at the label channel.
            ce = (F.softplus(flat).sum() - flat.gather(1, labels[:, None]).sum()) / flat.numel()
        return dice, ce

    def _partial_terms(self, flat: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``terms`` for flat logits (B, K, N), labels (B, N) and a mask (B, K) with some False."""
        if self.activation == "softmax":
            # Marginal probabilities: background takes the mass of every unlabelled class.
            probs = torch.softmax(flat, 1)
            unlabelled = ~labelled
            merged = probs * labelled[:, :, None]
            merged[:, 0] += (probs * unlabelled[:, :, None]).sum(1)
            scored = labelled
            # CE of the merged distribution: -log p'(y), with log p'(0) = logsumexp over {0} + unlabelled.
            log_norm = torch.logsumexp(flat, 1)  # (B, N)
            background_set = unlabelled.clone()
            background_set[:, 0] = True
            log_background = torch.logsumexp(flat.masked_fill(~background_set[:, :, None], float("-inf")), 1)
            log_label = flat.gather(1, labels[:, None]).squeeze(1)
            ce = (log_norm - torch.where(labels == 0, log_background, log_label)).mean()
        else:
            merged = torch.sigmoid(flat)
            scored = labelled.clone()
            scored[:, 0] = labelled[:, 1:].all(1)  # "no class here" is known only where every class is labelled
            weight = scored.to(flat.dtype)  # (B, K)
            on_label = flat.gather(1, labels[:, None]).squeeze(1) * weight.gather(1, labels)  # (B, N)
            ce = ((F.softplus(flat) * weight[:, :, None]).sum() - on_label.sum()) / (weight.sum() * flat.shape[2])
        dice = (self._dice_per_item(merged, labels) * scored).sum() / scored.sum()
        return dice.to(flat.dtype), ce

    def _dice_per_item(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Soft Dice loss per sample and class, float64 (B, K), of probs (B, K, N) against labels (B, N)."""
        batch, num_classes = probs.shape[:2]
        # Per sample and class: the probability mass on that class's voxels and the voxel count. The
        # scatter adds one value at a time, so it accumulates in float64 to stay as accurate as a pairwise sum.
        prob_on_label = probs.gather(1, labels[:, None]).squeeze(1)  # (B, N)
        intersection = torch.zeros(batch, num_classes, dtype=torch.float64, device=probs.device)
        intersection = intersection.scatter_add(1, labels, prob_on_label.double())
        sample_offset = torch.arange(batch, device=probs.device)[:, None] * num_classes
        label_count = torch.bincount((labels + sample_offset).reshape(-1), minlength=batch * num_classes)
        denominator = label_count.reshape(batch, num_classes) + probs.sum(2).double()
        return 1.0 - (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Weighted sum as a scalar. logits: (B, K, *S); target: (B, 1, *S) or (B, *S); labelled: see ``terms``."""
        dice, ce = self.terms(logits, target, labelled)
        return self.lambda_dice * dice + self.lambda_ce * ce


def _flat_labels(target: torch.Tensor, logits_shape: torch.Size) -> torch.Tensor:
    """target (B, 1, *S) or (B, *S) -> (B, N) int64 on the same device, shape-checked against logits."""
    spatial = tuple(logits_shape[2:])
    if target.dim() == len(logits_shape) and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (logits_shape[0], *spatial):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits_shape)}")
    return target.reshape(target.shape[0], -1).long()


def _labelled_mask(labelled: torch.Tensor, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """labelled (B, K) -> bool on ``device`` with column 0 (background) set, shape-checked."""
    if tuple(labelled.shape) != (batch, num_classes):
        raise ValueError(f"labelled shape {tuple(labelled.shape)} is not (batch, classes) = ({batch}, {num_classes})")
    mask = labelled.to(device=device, dtype=torch.bool).clone()
    mask[:, 0] = True
    return mask
