"""Bias compensation (FLAP): keep the mean contribution of the input channels a plan removes.

Removing input column c of an "in" projection y = W x + b (an o-projection column of a head, the
down-projection column of a channel) drops W[:, c] x_c from every output. Its mean over the
calibration tokens is kept by adding it to the bias: b += W[:, removed] @ mean(x[removed]).

The plan records, per projection that loses columns, the removed positions and their input means
(`Plan.compensation`); both appliers add the same shift (`bias_shifts`), computed from the weights
before any change, so a masked and a sliced model still give the same logits.

It needs a bias on the projection. Llama-style models have none on the attention output and MLP down projections (unless
their config sets attention_bias / mlp_bias, which adds biases to every projection of the block).
Giving one projection a bias would change the architecture beyond what the plan describes and
what the family's config can express, so there planning with compensation is refused, before
calibration and before any change, with an error saying so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError, PlanError
from ..plan import Plan
from ..scoring.calibration import CalibrationStats
from ..units.table import UnitTable
from .positions import complement, pruned_positions


def check_biases(model: nn.Module, units: UnitTable) -> None:
    """Refuse compensation, before any work, where an "in" projection has no bias to fold into."""
    missing = [path for path in units.input_projection_paths() if model.get_submodule(path).bias is None]
    if missing:
        raise ConfigurationError(
            f"Bias compensation folds the mean of removed input channels into the output projection's bias, but "
            f"{len(missing)} of them have no bias (for example {missing[0]}). This {units.spec.name} model would "
            "need a bias its config does not describe, so adaprune refuses rather than change the architecture: "
            "plan without compensate=True, or use a model whose config gives these projections a bias.")


def input_means(units: UnitTable, stats: CalibrationStats) -> dict[str, torch.Tensor]:
    """The calibration mean of every "in" projection's input, per channel (float64)."""
    return {path: stats.activations[path].mean.clone() for path in units.input_projection_paths()}


def compensation_entries(plan: Plan, model: nn.Module, units: UnitTable,
                         means: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Plan.compensation: per "in" projection the plan shrinks, its removed positions and their input means."""
    entries = []
    for path, linear, axis, kept in pruned_positions(plan, units, model):
        if axis != "in":
            continue
        if path not in means:
            raise ConfigurationError(f"No input means for {path}: score with an estimator that compensates biases "
                                     "(e.g. {'name': 'fluctuation', 'compensate': True}) to plan with compensation.")
        removed = complement(kept, linear.weight.shape[1])
        entries.append({"projection": path, "positions": removed.tolist(),
                        "mean": [float(v) for v in means[path][removed]]})
    return entries


def bias_shifts(plan: Plan, model: nn.Module, units: UnitTable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(bias, W[:, removed] @ mean) for each entry of `plan.compensation`.

    Every entry is checked against the plan and the model first; nothing is changed here.
    """
    if not plan.compensation:
        return []
    shrunk = {path: (linear, complement(kept, linear.weight.shape[1]))
              for path, linear, axis, kept in pruned_positions(plan, units, model) if axis == "in"}
    shifts = []
    for entry in plan.compensation:
        path = entry.get("projection")
        if path not in shrunk:
            raise PlanError(f"The plan compensates {path!r}, but removes none of its input columns; the plan is "
                            "corrupt or for another model.")
        linear, removed = shrunk[path]
        if entry.get("positions") != removed.tolist() or len(entry.get("mean", [])) != len(removed):
            raise PlanError(f"The plan's compensation of {path} lists other positions than the plan removes; the "
                            "plan is corrupt.")
        if linear.bias is None:
            raise PlanError(f"The plan folds the mean of removed inputs into the bias of {path}, which has none; "
                            "apply it to the model it was made for, or plan again without compensation.")
        weight = linear.weight.detach().to(torch.float64)
        mean = torch.tensor(entry["mean"], dtype=torch.float64, device=weight.device)
        shifts.append((linear.bias, weight[:, removed.to(weight.device)] @ mean))
    return shifts
