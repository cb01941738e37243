"""adaprune's extension points, as pluggy hook specifications.

An extension point is a documented function signature (as in pytest and pluggy). A plugin is any
module or object with functions of these names marked ``@adaprune.hookimpl``. A package exposes
its plugin through one of the entry-point groups below (any of them registers the whole plugin
object, so one module may implement several hooks); adaprune loads them all into one plugin
manager (`adaprune.plugins.plugin_manager`), where the built-ins are registered the same way.

    [project.entry-points."adaprune.estimators"]
    my_estimators = "my_package.plugin"

Plugins are called latest-registered first, so a third-party plugin is asked before the
built-ins and may provide a name that shadows a built-in one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .allocation.base import Allocator
    from .estimators.base import Estimator
    from .fusion.base import FusionPolicy
    from .specs.base import ArchSpec

PROJECT = "adaprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The entry-point groups a package may register its plugin under.
ENTRY_POINT_GROUPS = ("adaprune.estimators", "adaprune.fusion_policies", "adaprune.allocations", "adaprune.specs")


@hookspec
def adaprune_estimators() -> list[type[Estimator]]:
    """Return the importance estimator classes this plugin provides.

    Each subclasses :class:`adaprune.Estimator`: a unique ``name``, the statistics it ``needs``,
    optionally ``gradient_terms()`` to be folded during the one calibration pass, and
    ``score(model, units, stats)`` returning ``{granularity: {level: [one tensor of unit scores
    per layer]}}`` with granularity ``"coarse"`` and/or ``"fine"`` and level a
    :class:`adaprune.Level`. See docs/writing-an-estimator.md.
    """


@hookspec
def adaprune_fusion_policies() -> list[type[FusionPolicy]]:
    """Return the fusion policy classes this plugin provides.

    Each subclasses :class:`adaprune.fusion.FusionPolicy`: a unique ``name``, options as keyword
    arguments (reported by its ``options`` property), and ``fuse(candidates, context)`` returning a
    :class:`adaprune.fusion.FusionResult`: one score per unit from the candidate scores of every
    estimator and granularity. ``context`` is a :class:`adaprune.fusion.FusionContext`.
    """


@hookspec
def adaprune_allocations() -> list[type[Allocator]]:
    """Return the allocation classes this plugin provides.

    Each subclasses :class:`adaprune.allocation.Allocator`: a unique ``name``, the properties it
    declares (``fixed_counts``, ``removes_blocks``), and ``allocate(units, scores, budget)``
    returning one :class:`adaprune.LayerPlan` per decoder layer.
    """


@hookspec
def adaprune_specs() -> list[type[ArchSpec]]:
    """Return the architecture spec classes (model families) this plugin provides.

    Each subclasses :class:`adaprune.specs.ArchSpec`; the default detection
    (:func:`adaprune_detect_spec` of the built-ins) tries them by ``ArchSpec.matches``.
    See docs/adding-a-family.md.
    """


@hookspec(firstresult=True)
def adaprune_detect_spec(model: nn.Module, specs: list[type[ArchSpec]]) -> ArchSpec | None:
    """Return the spec describing `model`, or None to let the next plugin decide.

    `specs` are all registered spec classes, latest-registered first. The first non-None answer
    wins; the built-in implementation returns the first spec whose ``matches(model)`` is true.
    A plugin implements this only to detect models in a way ``matches`` cannot express.
    """


__all__ = ["ENTRY_POINT_GROUPS", "PROJECT", "hookimpl", "hookspec"]
