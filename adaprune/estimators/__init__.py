"""Importance estimators, discovered as pluggy plugins.

Built-ins register here; third-party packages register through the ``adaprune.estimators``
entry-point group (see docs/writing-an-estimator.md).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pluggy
import torch

from ..calibration import CalibrationStats
from ..errors import AdapruneError, EstimatorError
from ..graph import Graph
from .base import GRANULARITIES, NEEDS, Estimator, Scores
from .hookspec import PROJECT, EstimatorHooks, hookimpl, hookspec

ENTRY_POINT_GROUP = "adaprune.estimators"


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager holding the built-in estimators and every installed plugin."""
    from . import activation, fluctuation, learned, magnitude, taylor

    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(EstimatorHooks)
    for module in (magnitude, taylor, activation, fluctuation, learned):
        manager.register(module)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def estimator_providers() -> dict[str, tuple[type[Estimator], str]]:
    """Each estimator name -> (its class, the name of the plugin providing it).

    Plugins are asked in pluggy's call order (the latest registered first); the first to
    provide a name wins.
    """
    providers: dict[str, tuple[type[Estimator], str]] = {}
    for impl in reversed(plugin_manager().hook.adaprune_estimators.get_hookimpls()):
        for cls in impl.function():
            providers.setdefault(cls.name, (cls, impl.plugin_name))
    return providers


def estimator_classes() -> dict[str, type[Estimator]]:
    return {name: cls for name, (cls, _) in estimator_providers().items()}


def list_estimators() -> list[str]:
    """Names of all registered estimators, built-in and third-party."""
    return sorted(estimator_classes())


def create_estimator(name: str, **options: Any) -> Estimator:
    """An estimator instance by name; an unknown name lists the available ones."""
    classes = estimator_classes()
    if name not in classes:
        raise EstimatorError(f"Unknown estimator {name!r}. Available: {', '.join(sorted(classes))}. "
                             f"Third-party estimators register through the {ENTRY_POINT_GROUP!r} entry-point group.")
    try:
        return classes[name](**options)
    except (TypeError, ValueError) as error:
        raise EstimatorError(f"Estimator {name!r} refused its options {options}: {error}") from error


def label(estimator: Estimator) -> str:
    """How errors name an estimator: its name and the plugin (or else the module) that provides it."""
    plugins = [plugin for cls, plugin in estimator_providers().values() if cls is type(estimator)]
    source = f"plugin {plugins[0]!r}" if plugins else f"module {type(estimator).__module__}"
    return f"{estimator.name!r} ({source})"


def run_estimator(estimator: Estimator, model: torch.nn.Module, graph: Graph, stats: CalibrationStats) -> Scores:
    """The estimator's scores, checked; a plugin's own failure is reported with its name."""
    try:
        scores = estimator.score(model, graph, stats)
    except AdapruneError:
        raise
    except Exception as error:
        raise EstimatorError(f"Estimator {label(estimator)} failed while scoring: {type(error).__name__}: "
                             f"{error}") from error
    return validate_scores(estimator, scores, graph)


def validate_scores(estimator: Estimator, scores: Scores, graph: Graph) -> Scores:
    """Refuse scores of the wrong shape or with NaN/inf, naming the estimator; return them as float64."""
    if not isinstance(scores, dict) or not scores or not set(scores) <= set(GRANULARITIES):
        raise EstimatorError(f"Estimator {label(estimator)} returned granularities "
                             f"{sorted(scores) if isinstance(scores, dict) else type(scores).__name__}; expected "
                             f"a non-empty dict with keys among {GRANULARITIES}.")
    clean: Scores = {}
    for granularity, by_level in scores.items():
        clean[granularity] = {}
        for level, per_layer in by_level.items():
            if len(per_layer) != len(graph):
                raise EstimatorError(f"Estimator {label(estimator)} returned {len(per_layer)} layers of {level} "
                                     f"scores for a model with {len(graph)} layers.")
            tensors = []
            for layer, values in zip(graph, per_layer):
                values = torch.as_tensor(values).detach().to(torch.float64).cpu().flatten()
                expected = layer.num_units[level]
                if values.numel() != expected:
                    raise EstimatorError(f"Estimator {label(estimator)} returned {values.numel()} {level} scores for "
                                         f"layer {layer.index}, which has {expected} units.")
                if not torch.isfinite(values).all():
                    raise EstimatorError(f"Estimator {label(estimator)} returned NaN or infinite {level} scores for "
                                         f"layer {layer.index}; the model was not changed.")
                tensors.append(values)
            clean[granularity][level] = tensors
    return clean


def parse_estimator(spec: str | dict | Estimator) -> Estimator:
    """Accept a name ("taylor"), a name with options ({"name": "taylor", "order": 2}) or an instance."""
    if isinstance(spec, Estimator):
        estimator = spec
    elif isinstance(spec, str):
        estimator = create_estimator(spec)
    elif isinstance(spec, dict) and "name" in spec:
        options = {k: v for k, v in spec.items() if k != "name"}
        estimator = create_estimator(spec["name"], **options)
    else:
        raise EstimatorError(f"Cannot read estimator {spec!r}: give a name, a dict with 'name' and options, "
                             "or an Estimator instance.")
    unknown = set(estimator.needs) - NEEDS
    if unknown:
        raise EstimatorError(f"Estimator {label(estimator)} needs {sorted(unknown)}, which the calibration pass "
                             f"cannot provide; it can ask for {sorted(NEEDS)}.")
    if estimator.compensates_bias and "activations" not in estimator.needs:
        raise EstimatorError(f"Estimator {label(estimator)} compensates biases, which needs 'activations'.")
    return estimator


__all__ = ["Estimator", "NEEDS", "GRANULARITIES", "Scores", "hookimpl", "hookspec", "list_estimators",
           "create_estimator", "parse_estimator", "run_estimator", "validate_scores", "plugin_manager",
           "ENTRY_POINT_GROUP"]
