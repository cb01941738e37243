"""Fluctuation: FLAP's structured score, how much a unit's input varies times how much it weighs.

For every column c of an "in" projection (the o-projection columns of a head, the down-projection
column of an MLP channel) the score is Var(X_c) * ||W[:, c]||^2, the variance of input channel c
over the calibration tokens (Welford running statistics in float64, see
`adaprune.calibration.ActivationStats`) times the squared norm of the column; a unit's score is
the sum over its columns. Rows of "out" projections do not count: what a removed unit takes away
is its input channel's contribution to the output projection.

A channel that hardly fluctuates contributes nearly a constant, W[:, c] * mean(X_c). With
``compensate=True`` a plan made with this estimator keeps that constant: at apply time the output
projection's bias gains W[:, removed] @ mean(X[removed]) (see `adaprune.compensation`). This needs
a bias on that projection; where the model has none, planning is refused before any change.
The score alone is a whole-unit (structured) metric, reported as the ``coarse`` granularity.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scoring.calibration import CalibrationStats
from ..units.positionwise import positionwise_sum
from ..units.table import Member, UnitTable
from ..vocabulary import LEVELS
from .base import Estimator, Scores
from ..hookspecs import hookimpl


class FluctuationEstimator(Estimator):
    name = "fluctuation"
    needs = frozenset({"weights", "activations"})

    def __init__(self, compensate: bool = False) -> None:
        if not isinstance(compensate, bool):
            raise ValueError(f"fluctuation compensate must be true or false, got {compensate!r}")
        self.compensate = compensate

    @property
    def compensates_bias(self) -> bool:  # type: ignore[override]
        return self.compensate

    @property
    def options(self) -> dict:
        return {"compensate": self.compensate}

    def score(self, model: nn.Module, units: UnitTable, stats: CalibrationStats) -> Scores:
        params = dict(model.named_parameters())

        def per_position(member: Member) -> torch.Tensor:
            weight = params[member.param_name].detach()
            if member.dim != 1 or weight.dim() != 2:  # only the columns of "in" projections count
                return torch.zeros(member.owner.numel(), dtype=torch.float64)
            squares = positionwise_sum(lambda w: w.to(torch.float64) ** 2, (weight,), 1).cpu()
            return stats.activations[member.module_path].variance * squares

        return {"coarse": {level: units.reduce(level, per_position) for level in LEVELS}}


@hookimpl
def adaprune_estimators():
    return [FluctuationEstimator]
