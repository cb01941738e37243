"""The estimator interface: what an importance estimator declares and returns."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..calibration import CalibrationStats, GradientTerm
from ..graph import Graph

#: What an estimator may ask the calibration pass for.
NEEDS = frozenset({"weights", "activations", "gradients", "per_sample_gradients"})
GRANULARITIES = ("coarse", "fine")

#: granularity -> level -> one tensor of unit scores per layer (higher = more important)
Scores = dict[str, dict[str, list[torch.Tensor]]]


class Estimator:
    """Scores every unit of a graph; higher means more important.

    An estimator sees units and statistics, never edits modules. Subclasses set ``name`` and
    ``needs``, accept their options as keyword arguments, and implement ``score``.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"estimator {self.name!r} takes no options, got {sorted(options)}")

    @property
    def options(self) -> dict[str, Any]:
        """The options this instance was built with (recorded in plans and score caches)."""
        return {}

    def gradient_terms(self) -> list[GradientTerm]:
        """Elementwise (weight, gradient) terms to fold during calibration. Names must be unique."""
        return []

    def score(self, model: nn.Module, graph: Graph, stats: CalibrationStats) -> Scores:
        raise NotImplementedError
