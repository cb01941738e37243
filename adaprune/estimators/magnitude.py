"""Magnitude: the size of a unit's weights, no data needed."""

from __future__ import annotations

import torch
from torch import nn

from ..scoring.calibration import CalibrationStats
from ..units.positionwise import positionwise_sum
from ..units.table import UnitTable
from ..vocabulary import LEVELS
from .base import Estimator, Scores
from ..hookspecs import hookimpl


class MagnitudeEstimator(Estimator):
    """``norm="l1"``: sum of |w| over the unit; ``norm="l2"``: the unit's Euclidean norm.

    One estimate serves as both the coarse and the fine granularity.
    """

    name = "magnitude"
    needs = frozenset({"weights"})

    def __init__(self, norm: str = "l2") -> None:
        if norm not in ("l1", "l2"):
            raise ValueError(f"magnitude norm must be 'l1' or 'l2', got {norm!r}")
        self.norm = norm

    @property
    def options(self) -> dict:
        return {"norm": self.norm}

    def score(self, model: nn.Module, units: UnitTable, stats: CalibrationStats) -> Scores:
        params = dict(model.named_parameters())
        power = 1 if self.norm == "l1" else 2

        def per_position(member):
            return positionwise_sum(lambda w: w.abs() ** power, (params[member.param_name].detach(),), member.dim)

        scores = {level: units.reduce(level, per_position) for level in LEVELS}
        if power == 2:
            scores = {level: [torch.sqrt(s) for s in per_layer] for level, per_layer in scores.items()}
        return {"coarse": scores, "fine": scores}


@hookimpl
def adaprune_estimators():
    return [MagnitudeEstimator]
