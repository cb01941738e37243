"""Importance estimators, discovered as pluggy plugins.

Built-ins register here; third-party packages register through the ``adaprune.estimators``
entry-point group (see docs/writing-an-estimator.md).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pluggy
import torch

from ..errors import EstimatorError
from ..graph import Graph
from .base import GRANULARITIES, NEEDS, Estimator, Scores
from .hookspec import PROJECT, EstimatorHooks, hookimpl, hookspec

ENTRY_POINT_GROUP = "adaprune.estimators"


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager holding the built-in estimators and every installed plugin."""
    from . import magnitude, taylor

    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(EstimatorHooks)
    for module in (magnitude, taylor):
        manager.register(module)
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager


def estimator_classes() -> dict[str, type[Estimator]]:
    classes: dict[str, type[Estimator]] = {}
    for provided in plugin_manager().hook.adaprune_estimators():
        for cls in provided:
            classes.setdefault(cls.name, cls)
    return classes


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


def validate_scores(estimator: Estimator, scores: Scores, graph: Graph) -> Scores:
    """Refuse scores of the wrong shape or with NaN/inf, naming the estimator; return them as float64."""
    if not isinstance(scores, dict) or not scores or not set(scores) <= set(GRANULARITIES):
        raise EstimatorError(f"Estimator {estimator.name!r} returned granularities "
                             f"{sorted(scores) if isinstance(scores, dict) else type(scores).__name__}; expected "
                             f"a non-empty dict with keys among {GRANULARITIES}.")
    clean: Scores = {}
    for granularity, by_level in scores.items():
        clean[granularity] = {}
        for level, per_layer in by_level.items():
            if len(per_layer) != len(graph):
                raise EstimatorError(f"Estimator {estimator.name!r} returned {len(per_layer)} layers of {level} "
                                     f"scores for a model with {len(graph)} layers.")
            tensors = []
            for layer, values in zip(graph, per_layer):
                values = torch.as_tensor(values).detach().to(torch.float64).cpu().flatten()
                expected = layer.num_units[level]
                if values.numel() != expected:
                    raise EstimatorError(f"Estimator {estimator.name!r} returned {values.numel()} {level} scores for "
                                         f"layer {layer.index}, which has {expected} units.")
                if not torch.isfinite(values).all():
                    raise EstimatorError(f"Estimator {estimator.name!r} returned NaN or infinite {level} scores for "
                                         f"layer {layer.index}; the model was not changed.")
                tensors.append(values)
            clean[granularity][level] = tensors
    return clean


def parse_estimator(spec: str | dict | Estimator) -> Estimator:
    """Accept a name ("taylor"), a name with options ({"name": "taylor", "order": 2}) or an instance."""
    if isinstance(spec, Estimator):
        return spec
    if isinstance(spec, str):
        return create_estimator(spec)
    if isinstance(spec, dict) and "name" in spec:
        options = {k: v for k, v in spec.items() if k != "name"}
        return create_estimator(spec["name"], **options)
    raise EstimatorError(f"Cannot read estimator {spec!r}: give a name, a dict with 'name' and options, "
                         "or an Estimator instance.")


__all__ = ["Estimator", "NEEDS", "GRANULARITIES", "Scores", "hookimpl", "hookspec", "list_estimators",
           "create_estimator", "parse_estimator", "validate_scores", "plugin_manager", "ENTRY_POINT_GROUP"]
