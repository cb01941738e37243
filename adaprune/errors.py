"""Exceptions. Each message names the problem and the fix."""


class AdapruneError(Exception):
    """Base class of adaprune's errors."""


class UnsupportedArchitectureError(AdapruneError, TypeError):
    """The model's family has no architecture spec."""


class PlanError(AdapruneError, ValueError):
    """A plan is corrupt, inconsistent, or made for another model."""


class CalibrationError(AdapruneError, ValueError):
    """The calibration data cannot be used."""


class EstimatorError(AdapruneError, ValueError):
    """An estimator is unknown or returned unusable scores."""


class ConfigurationError(AdapruneError, ValueError):
    """An argument of the Pruner is out of range or unknown."""


class ExportError(AdapruneError, ValueError):
    """A model cannot be written in the asked format, or the target cannot be written."""


class OutputError(AdapruneError, ValueError):
    """A path to write to cannot be used (a file where a folder is needed, not writable, the input itself)."""


class AdapruneWarning(UserWarning):
    """Base class of adaprune's warnings."""


class FusionWarning(AdapruneWarning):
    """A fusion policy fell back or could not rank some units (also recorded in plan.fusion['warnings'])."""


class MaskedModelWarning(AdapruneWarning):
    """A masked model is saved or exported: its checkpoint keeps every zeroed unit at full size."""


class DistributedError(AdapruneError, RuntimeError):
    """A collective of a multi-process run failed: a rank died, hung past the timeout, or disagrees."""
