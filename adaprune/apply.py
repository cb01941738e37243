"""The two appliers of one Plan: `mask` zeroes units reversibly, `slice_model` removes them.

Both check the whole plan before touching the first tensor, and both go through the same
projection layouts, so the same plan gives the same logits either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .graph import Graph
from .plan import Plan, kept_positions
from .specs.base import set_submodule


def check(plan: Plan, model: nn.Module, graph: Graph) -> None:
    """Raise PlanError unless `plan` fits `model` exactly. Touches nothing."""
    plan.validate(type(model).__name__, graph.shapes)


def count_removed(plan: Plan, graph: Graph) -> int:
    """Parameters the plan removes from the model `graph` describes."""
    removed = 0
    for layer_plan, layer in zip(plan.layers, graph):
        for level, indices in (("kv_group", layer_plan.remove_kv_groups), ("head", layer_plan.remove_heads),
                               ("channel", layer_plan.remove_channels)):
            if indices:
                removed += int(layer.unit_param_counts(level)[indices].sum())
    return removed


def _pruned_positions(plan: Plan, graph: Graph, model: nn.Module) -> Iterator[tuple[str, nn.Linear, str, torch.Tensor]]:
    """(module path, Linear, axis, kept indices) for every projection the plan shrinks."""
    for layer_plan, layer in zip(plan.layers, graph):
        keeps = layer_plan.keeps(layer.shape)
        for projection in layer.projections:
            kept = kept_positions(projection.owners, projection.block, keeps)
            if len(kept) == len(projection.owners) * projection.block:
                continue
            path = f"{layer.path}.{projection.path}"
            yield path, model.get_submodule(path), projection.axis, kept


class MaskHandle:
    """Keeps the values a mask zeroed, so that `restore()` puts them back."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    def zero(self, tensor: torch.Tensor, dim: int, positions: torch.Tensor) -> None:
        positions = positions.to(tensor.device)
        self._saved.append((tensor, dim, positions, tensor.detach().index_select(dim, positions).clone()))
        with torch.no_grad():
            tensor.index_fill_(dim, positions, 0)

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, dim, positions, values in reversed(self._saved):
                tensor.index_copy_(dim, positions, values)
        self._saved.clear()


def mask(plan: Plan, model: nn.Module, graph: Graph) -> MaskHandle:
    """Zero every parameter slice the plan removes. Returns a handle that can restore them."""
    check(plan, model, graph)
    handle = MaskHandle()
    for _, linear, axis, kept in _pruned_positions(plan, graph, model):
        dim = 0 if axis == "out" else 1
        dropped = _complement(kept, linear.weight.shape[dim])
        handle.zero(linear.weight, dim, dropped)
        if axis == "out" and linear.bias is not None:
            handle.zero(linear.bias, 0, dropped)
    return handle


def slice_model(plan: Plan, model: nn.Module, graph: Graph) -> None:
    """Physically remove what the plan removes: smaller Linear layers, rewritten attributes.

    The caller updates the config afterwards (`adaprune.export.sync_config`).
    """
    check(plan, model, graph)
    replacements = [(path, _sliced_linear(linear, axis, kept))
                    for path, linear, axis, kept in _pruned_positions(plan, graph, model)]
    for path, linear in replacements:
        set_submodule(model, path, linear)
    layers = graph.spec.decoder_layers(model)
    for layer_plan, layer, module in zip(plan.layers, graph, layers):
        new_shape = layer_plan.pruned_shape(layer.shape)
        removed = layer_plan.removed_query_heads(layer.shape.attention)
        kept_heads = [h for h in range(layer.shape.attention.num_heads) if h not in removed]
        graph.spec.rewrite_attention(module, new_shape.attention, kept_heads)
        graph.spec.rewrite_mlp(module, new_shape.mlp_width)


def _complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.zeros(size, dtype=torch.bool)
    keep[kept] = True
    return torch.nonzero(~keep).flatten()


def _sliced_linear(linear: nn.Linear, axis: str, kept: torch.Tensor) -> nn.Linear:
    dim = 0 if axis == "out" else 1
    weight = linear.weight.detach().index_select(dim, kept.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, kept.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new
