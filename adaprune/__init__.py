"""adaprune: structured pruning of decoder-only language models.

    from adaprune import Pruner
    pruner = Pruner(model, ratio=0.2, estimators=["taylor"])
    plan = pruner.plan(calibration)
    pruner.apply(plan)
    model.save_pretrained("pruned/")
"""

from .errors import (
    AdapruneError,
    CalibrationError,
    ConfigurationError,
    EstimatorError,
    PlanError,
    UnsupportedArchitectureError,
)
from .estimators import Estimator, hookimpl, list_estimators
from .graph import Graph
from .plan import LayerPlan, Plan
from .pruner import Pruner
from .scores import ScoreCache

__version__ = "0.1.0"

__all__ = [
    "AdapruneError",
    "CalibrationError",
    "ConfigurationError",
    "Estimator",
    "EstimatorError",
    "Graph",
    "LayerPlan",
    "Plan",
    "PlanError",
    "Pruner",
    "ScoreCache",
    "UnsupportedArchitectureError",
    "hookimpl",
    "list_estimators",
]
