"""Passes that need gradients through a model that must come out exactly as it went in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration; afterwards every `requires_grad`, the train mode restored and no `.grad` left."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None
        model.train(was_training)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No weight gradients and eval mode for the duration; both restored afterwards.

    For passes that train something other than the weights (gates, blend weights).
    """
    with preserved(model):
        for p in model.parameters():
            p.requires_grad_(False)
        yield
