"""The extension point for importance estimators (pluggy hook specification).

A plugin is any module or object with a function marked ``@adaprune.estimators.hookimpl``
named ``adaprune_estimators`` that returns estimator classes. Third-party packages expose it
through the ``adaprune.estimators`` entry-point group; adaprune discovers it on import.
See docs/writing-an-estimator.md.
"""

from __future__ import annotations

import pluggy

PROJECT = "adaprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class EstimatorHooks:
    @hookspec
    def adaprune_estimators(self) -> list[type]:
        """Return the estimator classes this plugin provides.

        Each class subclasses :class:`adaprune.estimators.Estimator`: a unique ``name``, the
        statistics it ``needs``, optionally ``gradient_terms()`` to be folded during the one
        calibration pass, and ``score(model, graph, stats)`` returning
        ``{granularity: {level: [one tensor of unit scores per layer]}}`` with granularity
        ``"coarse"`` and/or ``"fine"`` and level among ``kv_group``, ``head``, ``channel``.
        """
