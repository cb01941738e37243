"""adaprune: structured pruning of decoder-only language models.

    from adaprune import Pruner
    pruner = Pruner(model, ratio=0.2, estimators=["taylor"])
    plan = pruner.plan(calibration)
    pruner.apply(plan)
    model.save_pretrained("pruned/")
"""

from .errors import (
    AdapruneError,
    AdapruneWarning,
    CalibrationError,
    ConfigurationError,
    EstimatorError,
    ExportError,
    FusionWarning,
    MaskedModelWarning,
    OutputError,
    PlanError,
    UnsupportedArchitectureError,
)
from .estimators.base import Estimator
from .export.gguf import export_gguf
from .hookspecs import hookimpl
from .pipeline import DEFAULTS, PruneConfig, Pruner
from .plan import LayerPlan, Plan
from .plugins import detect_spec, list_estimators, unit_table
from .scoring.cache import ScoreCache
from .stages.base import Stage, StageContext
from .stages.recover import RecoveryError, RecoveryReport, recover
from .units.table import UnitTable
from .vocabulary import BlockKind, Level, UnitKind

__version__ = "0.1.0"

__all__ = [
    "AdapruneError",
    "AdapruneWarning",
    "BlockKind",
    "CalibrationError",
    "ConfigurationError",
    "DEFAULTS",
    "Estimator",
    "EstimatorError",
    "ExportError",
    "FusionWarning",
    "LayerPlan",
    "Level",
    "MaskedModelWarning",
    "OutputError",
    "Plan",
    "PlanError",
    "PruneConfig",
    "Pruner",
    "RecoveryError",
    "RecoveryReport",
    "ScoreCache",
    "Stage",
    "StageContext",
    "UnitKind",
    "UnitTable",
    "UnsupportedArchitectureError",
    "detect_spec",
    "export_gguf",
    "hookimpl",
    "list_estimators",
    "recover",
    "unit_table",
]
