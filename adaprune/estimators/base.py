"""The estimator interface: what an importance estimator declares and returns."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..scoring.calibration import CalibrationStats, GradientTerm
from ..units.table import UnitTable
from ..vocabulary import Level

#: What an estimator may ask the calibration pass for:
#: ``weights`` (nothing to gather), ``activations`` (per-channel input statistics of every
#: prunable Linear), ``gradients`` (its gradient terms folded per unit or per position),
#: ``per_sample_gradients`` (the same, one sample per pass: squared per-sample gradients), and
#: ``calibration_data`` (the token batches themselves, for estimators that run the model).
NEEDS = frozenset({"weights", "activations", "gradients", "per_sample_gradients", "calibration_data"})
GRANULARITIES = ("coarse", "fine")

#: granularity -> level -> one tensor of unit scores per layer (higher = more important)
Scores = dict[str, dict[Level, list[torch.Tensor]]]


class Estimator:
    """Scores every unit of a model's unit table; higher means more important.

    An estimator sees units and statistics, never edits modules. Subclasses set ``name`` and
    ``needs``, accept their options as keyword arguments, and implement ``score``.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})
    #: Plans made with this estimator fold the mean input of removed "in"-projection positions
    #: into that projection's bias (see adaprune.compensation); needs ``activations``.
    compensates_bias: bool = False

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

    def score(self, model: nn.Module, units: UnitTable, stats: CalibrationStats) -> Scores:
        raise NotImplementedError
