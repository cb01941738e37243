"""Bias compensation (FLAP): keep the mean contribution of the input channels a plan removes.

Removing input column c of an "in" projection y = W x + b (an o-projection column of a head, the
down-projection column of a channel) drops W[:, c] x_c from every output. Its mean over the
calibration tokens is kept by adding it to the bias: b += W[:, removed] @ mean(x[removed]).

The plan records, per projection that loses columns, the removed positions and their input means
(`Plan.compensation`); both appliers add the same shift, computed from the weights before any
change, so a masked and a sliced model still give the same logits (adaprune.apply).

It needs a bias on the projection. Llama-style models have none on o_proj and down_proj (unless
their config sets attention_bias / mlp_bias, which adds biases to every projection of the block).
Giving one projection a bias would change the architecture beyond what the plan describes and
what the family's config can express, so there planning with compensation is refused, before
calibration and before any change, with an error saying so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .apply import _complement, _pruned_positions
from .calibration import CalibrationStats
from .errors import ConfigurationError
from .graph import Graph
from .plan import Plan


def in_projection_paths(graph: Graph) -> list[str]:
    """Module paths of every "in" projection (pruned along its input columns)."""
    return [f"{layer.path}.{projection.path}" for layer in graph for projection in layer.projections
            if projection.axis == "in"]


def check_biases(model: nn.Module, graph: Graph) -> None:
    """Refuse compensation, before any work, where an "in" projection has no bias to fold into."""
    missing = [path for path in in_projection_paths(graph) if model.get_submodule(path).bias is None]
    if missing:
        raise ConfigurationError(
            f"Bias compensation folds the mean of removed input channels into the output projection's bias, but "
            f"{len(missing)} of them have no bias (for example {missing[0]}). This {graph.spec.name} model would "
            "need a bias its config does not describe, so adaprune refuses rather than change the architecture: "
            "plan without compensate=True, or use a model whose config gives these projections a bias.")


def input_means(graph: Graph, stats: CalibrationStats) -> dict[str, torch.Tensor]:
    """The calibration mean of every "in" projection's input, per channel (float64)."""
    return {path: stats.activations[path].mean.clone() for path in in_projection_paths(graph)}


def compensation_entries(plan: Plan, model: nn.Module, graph: Graph,
                         means: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Plan.compensation: per "in" projection the plan shrinks, its removed positions and their input means."""
    entries = []
    for path, linear, axis, kept in _pruned_positions(plan, graph, model):
        if axis != "in":
            continue
        if path not in means:
            raise ConfigurationError(f"No input means for {path}: score with an estimator that compensates biases "
                                     "(e.g. {'name': 'fluctuation', 'compensate': True}) to plan with compensation.")
        removed = _complement(kept, linear.weight.shape[1])
        entries.append({"projection": path, "positions": removed.tolist(),
                        "mean": [float(v) for v in means[path][removed]]})
    return entries
