"""The ownership table: removable units and every parameter slice each one owns.

DESIGN.md calls it the graph of units: its only relations are "unit owns slice" and "unit of a
coarser level holds units of a finer one", so it is kept as a table. Levels, coarse to fine:

* `Level.KV_GROUP`: a KV head with its query heads: q/k/v rows and o-projection columns;
* `Level.HEAD`: one query head: its q rows and o-projection columns (its KV group stays);
* `Level.CHANNEL`: one MLP channel: its rows in the up/gate projections, its column in the down one.

Every prunable row or column belongs to exactly one unit of each level that covers its
projection (`HEAD` leaves k/v rows to `KV_GROUP`). Units are identified by ``(layer, index)``
with the index as in the current model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..specs.base import ArchSpec, LayerShape, Owner, Projection
from ..vocabulary import LEVELS, BlockKind, Level

if TYPE_CHECKING:  # the plan module knows nothing of tables; a table counts what a plan's layers remove
    from ..plan import LayerPlan


@dataclass(frozen=True)
class Member:
    """One parameter's share in a level: which unit owns each position along one dimension."""

    param_name: str  # full name, as in model.named_parameters()
    module_path: str  # full path of the Linear holding it
    dim: int  # 0: rows (out features, and bias entries), 1: columns (in features)
    owner: torch.Tensor  # long, one entry per position along `dim`: unit index, or -1 for none
    width: int  # parameters per position: the size of the other dimension, 1 for a bias


@dataclass
class LayerUnits:
    """The units of one decoder layer, per level."""

    index: int
    path: str  # module path of the decoder layer
    shape: LayerShape
    projections: list[Projection]
    num_units: dict[Level, int] = field(default_factory=dict)
    members: dict[Level, list[Member]] = field(default_factory=dict)
    # Parameters of each block the family can remove whole and this layer still has: the units'
    # slices plus what no unit owns (an output bias, say).
    block_params: dict[BlockKind, int] = field(default_factory=dict)

    def unit_param_counts(self, level: Level) -> torch.Tensor:
        """Number of parameters each unit of `level` owns (long tensor)."""
        counts = torch.zeros(self.num_units[level], dtype=torch.long)
        for member in self.members[level]:
            owned = member.owner[member.owner >= 0]
            counts.index_add_(0, owned, torch.full_like(owned, member.width))
        return counts

    def prunable_size(self) -> int:
        """Parameters some unit of this layer owns (every KV group and every channel together)."""
        return int(self.unit_param_counts(Level.KV_GROUP).sum() + self.unit_param_counts(Level.CHANNEL).sum())

    def input_members(self, level: Level) -> list[Member]:
        """The members of `level` that are input columns of a projection (the projections that read the units)."""
        return [member for member in self.members[level] if member.dim == 1]


class UnitTable:
    """Units of every decoder layer of a model, built from its architecture spec."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.spec = spec
        self.layers: list[LayerUnits] = []
        names = {id(module): name for name, module in model.named_modules()}
        params = dict(model.named_parameters())
        for index, layer in enumerate(spec.decoder_layers(model)):
            shape = spec.layer_shape(model, layer)
            projections = spec.attention_projections(shape.attention) + spec.mlp_projections(shape.mlp_width)
            layer_units = LayerUnits(index, names[id(layer)], shape, projections)
            _fill_levels(layer_units, params)
            layer_units.block_params = {
                kind: sum(p.numel() for p in layer.get_submodule(block.path).parameters())
                for kind, block in spec.removable_blocks().items() if kind not in shape.removed_blocks()}
            self.layers.append(layer_units)

    def subset(self, indices: Sequence[int]) -> UnitTable:
        """A table of only the layers at `indices` (each keeping its own index and path)."""
        view = copy.copy(self)
        view.layers = [self.layers[i] for i in indices]
        return view

    def __iter__(self) -> Iterator[LayerUnits]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    def prunable_parameters(self) -> list[str]:
        """Names of all parameters that some unit slices."""
        return sorted({m.param_name for layer in self.layers for level in LEVELS for m in layer.members[level]})

    def prunable_count(self) -> int:
        """Parameters some unit owns, over all layers."""
        return sum(layer.prunable_size() for layer in self.layers)

    def count_removed(self, layer_plans: Sequence[LayerPlan]) -> int:
        """Parameters removed by `layer_plans` (one per layer) from the model this table describes."""
        removed = 0
        for layer_plan, layer in zip(layer_plans, self.layers):
            removed += sum(layer.block_params.get(kind, 0) for kind in layer_plan.removed_blocks())
            for level, indices in ((Level.KV_GROUP, layer_plan.remove_kv_groups), (Level.HEAD, layer_plan.remove_heads),
                                   (Level.CHANNEL, layer_plan.remove_channels)):
                if indices:
                    removed += int(layer.unit_param_counts(level)[indices].sum())
        return removed

    def input_projection_paths(self) -> list[str]:
        """Module paths of every projection that reads units (pruned along its input columns)."""
        return [f"{layer.path}.{projection.path}" for layer in self.layers for projection in layer.projections
                if projection.axis == "in"]

    def reduce(self, level: Level, per_position: Callable[[Member], torch.Tensor]) -> list[torch.Tensor]:
        """Sum a per-position quantity into per-unit totals, one float64 tensor per layer.

        `per_position(member)` returns a 1-D tensor with one value per position along
        `member.dim` (for example the absolute weights summed over the other dimension).
        """
        totals = []
        for layer in self.layers:
            total = torch.zeros(layer.num_units[level], dtype=torch.float64)
            for member in layer.members[level]:
                values = per_position(member).detach().to(torch.float64).flatten().cpu()
                owned = member.owner >= 0
                total.index_add_(0, member.owner[owned], values[owned])
            totals.append(total)
        return totals


def owner_index(level: Level, shape: LayerShape) -> Callable[[Owner], int]:
    """Which unit of `level` owns a block owner of the spec's layouts (-1: none of this level)."""
    per_group = shape.attention.heads_per_group

    def owner(block_owner: Owner) -> int:
        kind, index = block_owner
        if level is Level.KV_GROUP:
            return index // per_group if kind is Level.HEAD else (index if kind is Level.KV_GROUP else -1)
        return index if kind is level else -1

    return owner


def _fill_levels(layer: LayerUnits, params: dict[str, nn.Parameter]) -> None:
    attention = layer.shape.attention
    layer.num_units = {Level.KV_GROUP: attention.num_kv_heads, Level.HEAD: attention.num_heads,
                       Level.CHANNEL: layer.shape.mlp_width}
    for level in LEVELS:
        owner_of = owner_index(level, layer.shape)
        members: list[Member] = []
        for projection in layer.projections:
            owners = [owner_of(o) for o in projection.owners for _ in range(projection.block)]
            if all(o < 0 for o in owners):
                continue
            owner = torch.tensor(owners, dtype=torch.long)
            module_path = f"{layer.path}.{projection.path}"
            weight_name = f"{module_path}.weight"
            weight = params[weight_name]
            dim = 0 if projection.axis == "out" else 1
            if weight.shape[dim] != len(owners):
                raise ValueError(
                    f"{weight_name} has {weight.shape[dim]} positions along dim {dim}, but the spec's layout "
                    f"describes {len(owners)}: the architecture spec does not fit this model."
                )
            members.append(Member(weight_name, module_path, dim, owner, weight.shape[1 - dim]))
            bias_name = f"{module_path}.bias"
            if dim == 0 and bias_name in params:
                members.append(Member(bias_name, module_path, 0, owner, 1))
        layer.members[level] = members
