"""Where a plan cuts: the positions of every projection it shrinks, checked against the model first."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..errors import PlanError
from ..plan import Plan, kept_positions
from ..specs.base import stock_class
from ..units.table import UnitTable
from ..vocabulary import BlockKind


def check(plan: Plan, model: nn.Module, units: UnitTable) -> None:
    """Raise PlanError unless `plan` fits `model` exactly. Touches nothing."""
    plan.validate(stock_class(type(model)).__name__, units.shapes)
    removable = units.spec.removable_blocks()
    for layer_plan in plan.layers:
        for kind in layer_plan.removed_blocks():
            if kind not in removable:
                raise PlanError(f"Layer {layer_plan.index}: the plan removes the whole {kind} block, but the "
                                f"{units.spec.name} family cannot run without it; plan again without 'blocks' "
                                "in units.")


def block_path(units: UnitTable, layer_path: str, kind: BlockKind) -> str:
    """The module path of a layer's `kind` block."""
    return f"{layer_path}.{units.spec.removable_blocks()[kind].path}"


def pruned_positions(plan: Plan, units: UnitTable, model: nn.Module) -> Iterator[tuple[str, nn.Linear, str, torch.Tensor]]:
    """(module path, Linear, axis, kept indices) for every projection the plan shrinks.

    Projections of a block that goes whole are left out: the block is handled as one.
    """
    for layer_plan, layer in zip(plan.layers, units):
        keeps = layer_plan.keeps(layer.shape)
        gone = [f"{block_path(units, layer.path, kind)}." for kind in layer_plan.removed_blocks()]
        for projection in layer.projections:
            if any(f"{layer.path}.{projection.path}".startswith(prefix) for prefix in gone):
                continue
            kept = kept_positions(projection.owners, projection.block, keeps)
            if len(kept) == len(projection.owners) * projection.block:
                continue
            path = f"{layer.path}.{projection.path}"
            yield path, model.get_submodule(path), projection.axis, kept


def complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    """The positions of [0, size) not in `kept`."""
    keep = torch.zeros(size, dtype=torch.bool)
    keep[kept] = True
    return torch.nonzero(~keep).flatten()
