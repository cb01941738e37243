"""Importance estimators: the interface, and the built-ins (each module registers itself as a plugin).

Third-party packages register more through the ``adaprune.estimators`` entry-point group
(see `adaprune.hookspecs` and docs/writing-an-estimator.md).
"""

from .base import GRANULARITIES, NEEDS, Estimator, Scores

__all__ = ["Estimator", "GRANULARITIES", "NEEDS", "Scores"]
