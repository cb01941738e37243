"""The dependency graph: removable units and every parameter slice each one owns.

Levels, from coarse to fine:

* ``kv_group`` — a KV head with its query heads: q/k/v rows and o-projection columns;
* ``head`` — one query head: its q rows and o-projection columns (its KV group stays);
* ``channel`` — one MLP channel: its rows in the up/gate projections, its column in the down projection.

Every prunable row or column belongs to exactly one unit of each level that covers its
projection (``head`` leaves k/v rows to ``kv_group``). Units are identified by
``(layer, index)`` with the index as in the current model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .specs import ArchSpec, LayerShape, Projection, detect_spec

ATTENTION_LEVELS = ("kv_group", "head")
MLP_LEVELS = ("channel",)
LEVELS = ATTENTION_LEVELS + MLP_LEVELS


@dataclass(frozen=True)
class Member:
    """One parameter's share in a level: which unit owns each position along one dimension."""

    param_name: str  # full name, as in model.named_parameters()
    module_path: str  # full path of the Linear holding it
    dim: int  # 0: rows (out features, and bias entries), 1: columns (in features)
    owner: torch.Tensor  # long, one entry per position along `dim`: unit index, or -1 for none
    width: int  # parameters per position: the size of the other dimension, 1 for a bias


@dataclass
class LayerGraph:
    """The units of one decoder layer, per level."""

    index: int
    path: str  # module path of the decoder layer
    shape: LayerShape
    projections: list[Projection]
    num_units: dict[str, int] = field(default_factory=dict)
    members: dict[str, list[Member]] = field(default_factory=dict)
    # Parameters of each block the family can remove whole ("attention", "mlp") and this layer
    # still has: the units' slices plus what no unit owns (an output bias, say).
    block_params: dict[str, int] = field(default_factory=dict)

    def unit_param_counts(self, level: str) -> torch.Tensor:
        """Number of parameters each unit of `level` owns (long tensor)."""
        counts = torch.zeros(self.num_units[level], dtype=torch.long)
        for member in self.members[level]:
            owned = member.owner[member.owner >= 0]
            counts.index_add_(0, owned, torch.full_like(owned, member.width))
        return counts


class Graph:
    """Units of every decoder layer of a model, built from its architecture spec."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.spec = spec or detect_spec(model)
        self.layers: list[LayerGraph] = []
        names = {id(module): name for name, module in model.named_modules()}
        params = dict(model.named_parameters())
        for index, layer in enumerate(self.spec.decoder_layers(model)):
            shape = self.spec.layer_shape(model, layer)
            projections = self.spec.attention_projections(shape.attention) + self.spec.mlp_projections(shape.mlp_width)
            layer_graph = LayerGraph(index, names[id(layer)], shape, projections)
            _fill_levels(layer_graph, params)
            layer_graph.block_params = {
                kind: sum(p.numel() for p in layer.get_submodule(block.path).parameters())
                for kind, block in self.spec.removable_blocks().items() if kind not in shape.removed_blocks()}
            self.layers.append(layer_graph)

    def __iter__(self) -> Iterator[LayerGraph]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    def prunable_parameters(self) -> list[str]:
        """Names of all parameters that some unit slices."""
        return sorted({m.param_name for layer in self.layers for level in LEVELS for m in layer.members[level]})

    def prunable_count(self, model: nn.Module) -> int:
        params = dict(model.named_parameters())
        return sum(params[name].numel() for name in self.prunable_parameters())

    def reduce(self, level: str, per_position: Callable[[Member], torch.Tensor]) -> list[torch.Tensor]:
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


def _owner_map(level: str, shape: LayerShape) -> Callable[[tuple[str, int]], int]:
    per_group = shape.attention.heads_per_group

    def owner(block_owner: tuple[str, int]) -> int:
        kind, index = block_owner
        if level == "kv_group":
            return index // per_group if kind == "q" else (index if kind == "kv" else -1)
        if level == "head":
            return index if kind == "q" else -1
        return index if kind == "ch" else -1

    return owner


def _fill_levels(layer: LayerGraph, params: dict[str, nn.Parameter]) -> None:
    attention = layer.shape.attention
    layer.num_units = {"kv_group": attention.num_kv_heads, "head": attention.num_heads, "channel": layer.shape.mlp_width}
    for level in LEVELS:
        owner_of = _owner_map(level, layer.shape)
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
