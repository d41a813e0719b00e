"""Alternating training (ALT), the paper's Algorithm 1: one network, unpaired scans of several modalities.

An epoch is ``max(len(loader))`` iterations over one loader per modality. Each iteration takes one batch of
every modality in a fixed order (CT then MR, or the reverse) and for each runs the forward pass with that
modality's prompts, the Dice + CE loss, backward and an optimizer step; a loader that runs out starts a new
pass over its scans. ``mixed_batches`` is the variant the paper compares with: one loader whose batches mix
the modalities, one step per batch. The learning rate follows ``warmup_cosine``, stepped once per epoch.

``alt_epoch`` is Algorithm 1 on one screen; ``train_step`` is one of its steps.

The shuffle of a pass comes from ``numpy.random.default_rng([seed, epoch, modality, pass])`` and its crops
from the same numbers plus the rank and the item, so a resumed run replays them exactly. Only torch, numpy
and mulmodseg's losses are imported: the module can be copied into another codebase with that one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mulmodseg.losses import DiceCELoss


def warmup_cosine(epoch: int, warmup_epochs: int, total_epochs: int) -> float:
    """LR factor for 0-based ``epoch``: linear warm-up reaching 1 in the last warm-up epoch, then cosine.

    The reference's scheduler (stepped before each epoch, warm-up denominator W - 1) reaches the base
    LR one epoch early and trains its last epoch at LR 0; here epoch ``W - 1`` is the first at the
    base LR, epoch ``W`` starts the cosine at 1, and the last epoch still has a positive LR.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


class EpochLoader:
    """The batches of one modality's crop dataset, a function of (seed, epoch, modality, pass, rank) alone.

    ``batches(epoch, pass_no)`` shuffles with ``default_rng([seed, epoch, modality, pass_no])``, the same
    order on every rank, gives this rank its share (``order[rank::world]``, padded by wrapping so that every
    rank has as many), and tells the dataset ``set_epoch((epoch, modality, pass_no, rank))``, the rest of
    the numbers its random crops are drawn from. ``collate`` joins a batch's items (DataLoader's default
    when None). ``modality``: the modality's index in the run.
    """

    def __init__(self, dataset, batch_size: int, seed: int, modality: int = 0, collate: Callable | None = None,
                 num_workers: int = 0, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.seed, self.modality = dataset, batch_size, seed, modality
        self.collate, self.num_workers, self.rank, self.world = collate, num_workers, rank, world
        self.per_rank = math.ceil(len(dataset) / world)

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def batches(self, epoch: int, pass_no: int = 0) -> Iterator[dict]:
        """One pass over this rank's share: batches of ``collate``d items."""
        order = np.random.default_rng([self.seed, epoch, self.modality, pass_no]).permutation(len(self.dataset))
        share = (order.tolist() * self.world)[: self.per_rank * self.world][self.rank :: self.world]
        self.dataset.set_epoch((epoch, self.modality, pass_no, self.rank))
        yield from torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=share,
                                               num_workers=self.num_workers, collate_fn=self.collate)


class ConcatCrops(torch.utils.data.ConcatDataset):
    """Several modalities' crop datasets as one (``mixed_batches``); member m draws its crops as modality
    m's own loader would in that pass, ``set_epoch((epoch, m, pass, rank))``."""

    def set_epoch(self, draw: tuple[int, int, int, int]) -> None:
        epoch, _, pass_no, rank = draw
        for m, dataset in enumerate(self.datasets):
            dataset.set_epoch((epoch, m, pass_no, rank))


def cycling(loader: EpochLoader, epoch: int) -> Iterator[dict]:
    """The loader's batches for ``epoch``, starting a fresh pass whenever one runs out."""
    pass_no = 0
    while True:
        yield from loader.batches(epoch, pass_no)
        pass_no += 1


def alt_epoch(model: nn.Module, loaders: dict[str, EpochLoader], order: Sequence[str], epoch: int, *,
              loss_fn: DiceCELoss, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              device: torch.device, prepare: Callable[[dict], dict] = lambda batch: batch,
              after_step: Callable[[str, float, float], None] = lambda modality, dice, ce: None,
              **step_options) -> None:
    """Algorithm 1, one epoch: ``max(len)`` iterations; in each, for every modality in ``order``, one batch of
    that modality (``prepare``d: e.g. augmented on the device), the forward pass with its prompts, the loss and
    one optimizer step (``train_step``, with ``step_options``); ``after_step(modality, dice, ce)`` follows
    each step (logging, stopping rules). A loader that runs out starts a new pass over its scans."""
    batches = {modality: cycling(loaders[modality], epoch) for modality in order}
    for _ in range(max(len(loaders[modality]) for modality in order)):
        for modality in order:
            batch = prepare(next(batches[modality]))
            dice, ce = train_step(model, batch, modality, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler,
                                  device=device, **step_options)
            after_step(modality, dice, ce)


def mixed_batches(loader: EpochLoader, epoch: int) -> Iterator[tuple[list[str], dict]]:
    """One pass over a loader whose batches mix modalities; the modality is per crop."""
    for batch in loader.batches(epoch):
        yield batch["modality"], batch


@dataclass
class GradientGuard:
    """Never apply a corrupt gradient: ``admits(norm)`` is False for a total gradient norm that is not finite or
    above ``max_norm``, and counts the skipped steps (``skipped``, ``consecutive``).

    ``max_norm`` 1e15: a gradient element of 1e19 or more squares to inf in fp32, so AdamW's second moment of that
    parameter overflows and it stops learning (or turns NaN) for good, while the loss stays finite for a step or
    more. Healthy steps of the README's model measured norms of 0.46 to 10.9 (bench/gradient_guard.py, in
    bench/RESULTS.md), and the corrupt bf16 CPU gradients seen measured 1e29 to 1e35: any threshold between the
    two separates them; 1e15 keeps a wide margin to both sides and to fp32's range.
    """

    max_norm: float = 1e15
    skipped: int = 0
    consecutive: int = 0

    def admits(self, norm: float) -> bool:
        """Whether a step with this total gradient norm may be applied; counts it when not."""
        if math.isfinite(norm) and norm <= self.max_norm:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        return False


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite; under ``torch.distributed``, raises ``FloatingPointError`` on the ranks whose
    loss is finite when another rank's is not: every rank must stop together, since one that stopped alone would
    leave the others waiting forever in backward's gradient all-reduce."""
    finite = bool(torch.isfinite(loss))
    if dist.is_initialized():
        everywhere = torch.tensor([float(finite)], device=loss.device)
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
        if finite and not everywhere.item():
            raise FloatingPointError("the loss of another rank is not finite (its log says which); all ranks stop")
    return finite


def train_step(model: nn.Module, batch: dict, modality: str | list[str], *, loss_fn: DiceCELoss,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0,
               channels_last: bool = False, guard: GradientGuard | None = None) -> tuple[float, float]:
    """One forward/backward/optimizer step on ``batch`` ({"image": (B, 1, *roi), "label": (B, 1, *roi)} and, for
    partially labelled data, "labelled": (B, K) bool) of ``modality`` (one name, or one per sample); returns the
    unweighted (dice, ce) loss terms.

    Minimises ``loss_fn.lambda_dice * dice + loss_fn.lambda_ce * ce``, under autocast to ``amp_dtype`` (None:
    fp32), with the gradient norm clipped to ``grad_clip`` when > 0. A loss that is not finite raises
    ``FloatingPointError`` before any step, so the weights stay as they were; under ``torch.distributed``
    every rank raises when any rank's loss is not finite. ``channels_last``: the image as channels_last_3d,
    for a model already in that format. ``guard``: skips the optimizer step when the gradient is corrupt
    (``GradientGuard``); every rank decides alike, since DDP's backward has made their gradients equal.
    """
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = batch["label"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(image, modality)
    labelled = batch.get("labelled")
    dice, ce = loss_fn.terms(logits.float(), label, None if labelled is None else labelled.to(device))
    loss = loss_fn.lambda_dice * dice + loss_fn.lambda_ce * ce
    if not finite_everywhere(loss):
        rank = f" on rank {dist.get_rank()}" if dist.is_initialized() else ""
        raise FloatingPointError(f"loss is {loss.item()}{rank} (dice {dice.item()}, ce {ce.item()})")
    scaler.scale(loss).backward()
    if grad_clip > 0 or guard is not None:
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if guard is not None and not guard.admits(float(norm)):
            optimizer.zero_grad(set_to_none=True)  # the weights and the optimizer's moments stay as they were
            scaler.update()
            return dice.item(), ce.item()
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, grad_clip, norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return dice.item(), ce.item()
