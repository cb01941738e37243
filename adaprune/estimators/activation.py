"""Activation: a Wanda-style structured score, weight magnitude times input-activation norm.

Every weight W_ij is scored |W_ij| * ||X_j||, with ||X_j|| the Euclidean norm of input feature j
over all calibration tokens, and a unit's score is the sum over every weight it owns:

* a row i of an "out" projection (q/k/v, gate/up): sum_j |W_ij| ||X_j||, the input features j
  being shared by all rows;
* a column c of an "in" projection (o, down): sum_i |W_ic| ||X_c||, its own input feature;
* a bias entry b_i, whose input is the constant 1: |b_i| * sqrt(tokens).

The score is element-wise summed, so it is reported as the ``fine`` granularity only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scoring.calibration import ActivationStats, CalibrationStats
from ..units.positionwise import positionwise_sum
from ..units.table import Member, UnitTable
from ..vocabulary import LEVELS
from .base import Estimator, Scores
from ..hookspecs import hookimpl


def input_norms(stats: ActivationStats) -> torch.Tensor:
    """||X_j|| over all calibration tokens, per input feature (float64)."""
    return stats.sum_of_squares.clamp(min=0).sqrt()


class ActivationEstimator(Estimator):
    name = "activation"
    needs = frozenset({"weights", "activations"})

    def score(self, model: nn.Module, units: UnitTable, stats: CalibrationStats) -> Scores:
        params = dict(model.named_parameters())

        def per_position(member: Member) -> torch.Tensor:
            weight = params[member.param_name].detach()
            inputs = stats.activations[member.module_path]
            if weight.dim() == 1:  # a bias entry: input 1 on every token
                return weight.abs().to(torch.float64).cpu() * float(inputs.count) ** 0.5
            norms = input_norms(inputs)
            if member.dim == 0:  # a row's |w| weighted by the norm of the input each column reads
                scaled = norms.to(weight.device)
                return positionwise_sum(lambda w: w.abs().to(torch.float64) * scaled, (weight,), 0).cpu()
            return positionwise_sum(torch.abs, (weight,), 1).cpu() * norms

        return {"fine": {level: units.reduce(level, per_position) for level in LEVELS}}


@hookimpl
def adaprune_estimators():
    return [ActivationEstimator]
