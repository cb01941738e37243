"""Taylor: the first- (and second-) order estimate of the loss change when a unit is removed.

* coarse (vector-wise), ``reduction="whole"`` (default): |sum over the unit of w*g|, with g the
  gradient summed over passes: the loss change of removing the unit's weights as one vector;
* coarse with LLM-Pruner's group reduction, ``reduction`` in ``sum``, ``mean``, ``max``, ``prod``:
  every row (or column) of every coupled projection gets its own vector-wise score
  |sum over the row of w*g|; a projection's *partial* score for a unit is the sum of the unit's
  rows in it (a bias entry counts with its projection); the unit's score reduces those partials
  over the projections that cover it (q, k, v rows and o columns of a KV group, say);
* fine (element-wise, ``order=1``): sum over the unit of |w*g|, per gradient pass;
* fine with the Fisher term (``order=2``): sum over the unit of |w*g - 1/2 (w*g)^2| per
  sample, the diagonal Hessian approximated by the squared per-sample gradient.

Vector-wise sums are linear in g, so folding them pass by pass is exact, per unit or per row.
The element-wise scores are folded per pass (per sample with ``order=2``), which is what keeps
calibration at the model's memory plus one parameter's gradient; with one pass it equals
LLM-Pruner's.

Why partials per projection, not per aligned row as in LLM-Pruner: with grouped-query attention
a KV group has more q rows than k rows, so rows of coupled projections do not pair up one to one.
Summing a unit's rows inside each projection first gives every projection one number per unit,
and the reduction runs over those. For ``sum`` this equals LLM-Pruner's result; for ``mean`` it
ranks units the same way within a level; ``max`` and ``prod`` differ from a per-row reduction in
that a row's score counts towards its projection's partial before the reduction.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scoring.calibration import CalibrationStats, GradientTerm
from ..units.table import LayerUnits, UnitTable
from ..vocabulary import LEVELS
from .base import Estimator, Scores
from ..hookspecs import hookimpl

REDUCTIONS = ("whole", "sum", "mean", "max", "prod")


def _wg(w, g):
    return w * g


def _abs_wg(w, g):
    return (w * g).abs_()


def _abs_wg_fisher(w, g):
    wg = w * g
    return (wg - 0.5 * wg * wg).abs_()


class TaylorEstimator(Estimator):
    name = "taylor"

    def __init__(self, order: int = 1, reduction: str = "whole") -> None:
        if order not in (1, 2):
            raise ValueError(f"taylor order must be 1 or 2 (2 adds the Fisher term), got {order!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"taylor reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.order = order
        self.reduction = reduction

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"weights", "gradients"} | ({"per_sample_gradients"} if self.order == 2 else set()))

    @property
    def options(self) -> dict:
        return {"order": self.order, "reduction": self.reduction}

    def gradient_terms(self) -> list[GradientTerm]:
        fine = (GradientTerm("taylor.abs_wg", _abs_wg) if self.order == 1
                else GradientTerm("taylor.abs_wg_fisher", _abs_wg_fisher, per_sample=True))
        coarse = (GradientTerm("taylor.wg", _wg) if self.reduction == "whole"
                  else GradientTerm("taylor.wg_rows", _wg, per_position=True))
        return [coarse, fine]

    def score(self, model: nn.Module, units: UnitTable, stats: CalibrationStats) -> Scores:
        terms = stats.gradient_terms
        fine_name = "taylor.abs_wg" if self.order == 1 else "taylor.abs_wg_fisher"
        if self.reduction == "whole":
            coarse = {level: [t.abs() for t in per_layer] for level, per_layer in terms["taylor.wg"].items()}
        else:
            rows = stats.position_terms["taylor.wg_rows"]
            coarse = {level: [reduce_partials(*projection_partials(layer, level, rows), self.reduction)
                              for layer in units] for level in LEVELS}
        return {"coarse": coarse, "fine": terms[fine_name]}


def projection_partials(layer: LayerUnits, level: str,
                        rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per projection and unit, the sum of |row total| over the unit's rows in that projection.

    Returns `(partials, covers)`, both `[projections, units]`: `covers` says which projection
    holds rows of which unit. Bias entries join their projection's weight rows.
    """
    units = layer.num_units[level]
    partials: dict[str, torch.Tensor] = {}
    covers: dict[str, torch.Tensor] = {}
    for member in layer.members[level]:
        owned = member.owner >= 0
        partial = partials.setdefault(member.module_path, torch.zeros(units, dtype=torch.float64))
        partial.index_add_(0, member.owner[owned], rows[member.param_name].abs()[owned])
        covers.setdefault(member.module_path, torch.zeros(units, dtype=torch.bool))[member.owner[owned]] = True
    if not partials:  # a block that was removed whole has no rows left
        return torch.zeros(0, units, dtype=torch.float64), torch.zeros(0, units, dtype=torch.bool)
    return torch.stack(list(partials.values())), torch.stack(list(covers.values()))


def reduce_partials(partials: torch.Tensor, covers: torch.Tensor, reduction: str) -> torch.Tensor:
    """Combine the partial scores of the projections covering each unit (sum, mean, max, prod)."""
    if partials.shape[0] == 0:
        return torch.zeros(partials.shape[1], dtype=torch.float64)
    if reduction == "sum":
        return (partials * covers).sum(0)
    if reduction == "mean":
        return (partials * covers).sum(0) / covers.sum(0).clamp(min=1)
    if reduction == "max":
        return partials.masked_fill(~covers, 0.0).max(0).values  # partials are >= 0
    if reduction == "prod":
        return partials.masked_fill(~covers, 1.0).prod(0)
    raise ValueError(f"unknown reduction {reduction!r}")


@hookimpl
def adaprune_estimators():
    return [TaylorEstimator]
