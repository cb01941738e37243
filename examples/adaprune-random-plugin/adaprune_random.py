"""An example third-party adaprune estimator: seeded random unit scores.

Random importance is the baseline every real estimator must beat. Installing this package
registers it through the ``adaprune.estimators`` entry point (see pyproject.toml), after which

    Pruner(model, estimators=[{"name": "random", "seed": 0}])

uses it. Nothing in adaprune changes.
"""

from __future__ import annotations

import torch

from adaprune import Estimator, hookimpl
from adaprune.vocabulary import LEVELS


class RandomEstimator(Estimator):
    """Every unit gets a uniform random score in [0, 1), drawn from `seed` (layer by layer, level by level)."""

    name = "random"
    needs = frozenset({"weights"})  # nothing from the calibration pass

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    @property
    def options(self) -> dict:
        return {"seed": self.seed}

    def score(self, model, graph, stats):
        generator = torch.Generator().manual_seed(self.seed)
        scores = {level: [torch.rand(layer.num_units[level], generator=generator, dtype=torch.float64)
                          for layer in graph] for level in LEVELS}
        return {"coarse": scores}


@hookimpl
def adaprune_estimators():
    return [RandomEstimator]
