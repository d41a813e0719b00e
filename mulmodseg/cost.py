"""A model's cost: its parameter count and the floating-point operations of one forward pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "count_flops"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: Sequence[int], **forward_kwargs) -> int:
    """Floating-point operations of one forward pass on a zero input of ``input_shape``, e.g. (1, 1, 96, 96, 96).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: convolutions (incl. transposed), linear
    layers, matrix products and attention, with one multiply-accumulate counted as 2 FLOPs; element-wise
    work (normalisation, activations, bias adds, softmax) is not counted. GFLOPs = result / 1e9. The
    model runs once in eval mode without gradients (so BatchNorm statistics are untouched) and its
    train/eval mode is restored afterwards.
    """
    reference = next(iter(model.parameters()), None)
    x = torch.zeros(
        tuple(input_shape),
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x, **forward_kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
