"""What a pruned (or gated, or masked) model is trained to keep: the dense model's next-token distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def next_token_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities over the vocabulary at every position (float32, no gradient)."""
    with torch.no_grad():
        return F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


def kl_to_teacher(teacher_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), summed over the vocabulary and averaged over positions.

    `teacher_log_probs` are the dense model's (any float dtype), `logits` the student's raw output.
    """
    teacher = teacher_log_probs.float()
    student = F.log_softmax(logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()
