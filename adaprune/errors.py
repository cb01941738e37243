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


class DistributedError(AdapruneError, RuntimeError):
    """A collective of a multi-process run failed: a rank died, hung past the timeout, or disagrees."""
