"""Taylor: the first- (and second-) order estimate of the loss change when a unit is removed.

* coarse (vector-wise): |sum over the unit of w*g|, with g the gradient summed over passes;
* fine (element-wise, ``order=1``): sum over the unit of |w*g|, per gradient pass;
* fine with the Fisher term (``order=2``): sum over the unit of |w*g - 1/2 (w*g)^2| per
  sample, the diagonal Hessian approximated by the squared per-sample gradient.

Vector-wise sums are linear in g, so folding them pass by pass is exact. The element-wise
scores are folded per pass (per sample with ``order=2``), which is what keeps calibration at
the model's memory plus one parameter's gradient; with one pass it equals LLM-Pruner's.
"""

from __future__ import annotations

from torch import nn

from ..calibration import CalibrationStats, GradientTerm
from .base import Estimator, Scores
from .hookspec import hookimpl


def _wg(w, g):
    return w * g


def _abs_wg(w, g):
    return (w * g).abs()


def _abs_wg_fisher(w, g):
    wg = w * g
    return (wg - 0.5 * wg * wg).abs()


class TaylorEstimator(Estimator):
    name = "taylor"

    def __init__(self, order: int = 1) -> None:
        if order not in (1, 2):
            raise ValueError(f"taylor order must be 1 or 2 (2 adds the Fisher term), got {order!r}")
        self.order = order

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"weights", "gradients"} | ({"per_sample_gradients"} if self.order == 2 else set()))

    @property
    def options(self) -> dict:
        return {"order": self.order}

    def gradient_terms(self) -> list[GradientTerm]:
        fine = (GradientTerm("taylor.abs_wg", _abs_wg) if self.order == 1
                else GradientTerm("taylor.abs_wg_fisher", _abs_wg_fisher, per_sample=True))
        return [GradientTerm("taylor.wg", _wg), fine]

    def score(self, model: nn.Module, graph, stats: CalibrationStats) -> Scores:
        terms = stats.gradient_terms
        fine_name = "taylor.abs_wg" if self.order == 1 else "taylor.abs_wg_fisher"
        coarse = {level: [t.abs() for t in per_layer] for level, per_layer in terms["taylor.wg"].items()}
        return {"coarse": coarse, "fine": terms[fine_name]}


@hookimpl
def adaprune_estimators():
    return [TaylorEstimator]
