"""The two appliers of one Plan: `mask` zeroes units reversibly, `slice_model` removes them.

Both check the whole plan before touching the first tensor, and both go through the same
projection layouts, so the same plan gives the same logits either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .blocks import remove_block
from .errors import PlanError
from .graph import Graph
from .plan import Plan, kept_positions
from .specs.base import set_submodule


def check(plan: Plan, model: nn.Module, graph: Graph) -> None:
    """Raise PlanError unless `plan` fits `model` exactly. Touches nothing."""
    plan.validate(type(model).__name__, graph.shapes)
    removable = graph.spec.removable_blocks()
    for layer_plan in plan.layers:
        for kind in layer_plan.removed_blocks():
            if kind not in removable:
                raise PlanError(f"Layer {layer_plan.index}: the plan removes the whole {kind} block, but the "
                                f"{graph.spec.name} family cannot run without it; plan again without 'blocks' "
                                "in units.")


def count_removed(plan: Plan, graph: Graph) -> int:
    """Parameters the plan removes from the model `graph` describes."""
    removed = 0
    for layer_plan, layer in zip(plan.layers, graph):
        removed += sum(layer.block_params.get(kind, 0) for kind in layer_plan.removed_blocks())
        for level, indices in (("kv_group", layer_plan.remove_kv_groups), ("head", layer_plan.remove_heads),
                               ("channel", layer_plan.remove_channels)):
            if indices:
                removed += int(layer.unit_param_counts(level)[indices].sum())
    return removed


def _pruned_positions(plan: Plan, graph: Graph, model: nn.Module) -> Iterator[tuple[str, nn.Linear, str, torch.Tensor]]:
    """(module path, Linear, axis, kept indices) for every projection the plan shrinks.

    Projections of a block that goes whole are left out: the block is handled as one.
    """
    for layer_plan, layer in zip(plan.layers, graph):
        keeps = layer_plan.keeps(layer.shape)
        gone = [f"{_block_path(graph, layer.path, kind)}." for kind in layer_plan.removed_blocks()]
        for projection in layer.projections:
            if any(f"{layer.path}.{projection.path}".startswith(prefix) for prefix in gone):
                continue
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

    def shift(self, tensor: torch.Tensor, delta: torch.Tensor) -> None:
        """Add `delta` to a 1-D tensor (a bias), keeping its old values."""
        everything = torch.arange(tensor.shape[0], device=tensor.device)
        self._saved.append((tensor, 0, everything, tensor.detach().clone()))
        with torch.no_grad():
            tensor.add_(delta.to(device=tensor.device, dtype=tensor.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, dim, positions, values in reversed(self._saved):
                tensor.index_copy_(dim, positions, values)
        self._saved.clear()


def mask(plan: Plan, model: nn.Module, graph: Graph) -> MaskHandle:
    """Zero every parameter slice the plan removes. Returns a handle that can restore them."""
    check(plan, model, graph)
    shifts = bias_shifts(plan, model, graph)  # from the weights as they are, before any is zeroed
    handle = MaskHandle()
    for _, linear, axis, kept in _pruned_positions(plan, graph, model):
        dim = 0 if axis == "out" else 1
        dropped = _complement(kept, linear.weight.shape[dim])
        handle.zero(linear.weight, dim, dropped)
        if axis == "out" and linear.bias is not None:
            handle.zero(linear.bias, 0, dropped)
    # A block that goes whole: every parameter zeroed makes it output zeros (see specs.base.Block).
    for layer_plan, layer in zip(plan.layers, graph):
        for kind in layer_plan.removed_blocks():
            for param in model.get_submodule(_block_path(graph, layer.path, kind)).parameters():
                handle.zero(param, 0, torch.arange(param.shape[0]))
    for bias, delta in shifts:
        handle.shift(bias, delta)
    return handle


def slice_model(plan: Plan, model: nn.Module, graph: Graph) -> None:
    """Physically remove what the plan removes: smaller Linear layers, rewritten attributes.

    The caller updates the config afterwards (`adaprune.export.sync_config`).
    """
    check(plan, model, graph)
    with torch.no_grad():
        for bias, delta in bias_shifts(plan, model, graph):  # all checked before the first is added
            bias.add_(delta.to(device=bias.device, dtype=bias.dtype))
    replacements = [(path, _sliced_linear(linear, axis, kept))
                    for path, linear, axis, kept in _pruned_positions(plan, graph, model)]
    for path, linear in replacements:
        set_submodule(model, path, linear)
    layers = graph.spec.decoder_layers(model)
    blocks = graph.spec.removable_blocks()
    for layer_plan, layer, module in zip(plan.layers, graph, layers):
        new_shape = layer_plan.pruned_shape(layer.shape)
        gone = set(layer_plan.removed_blocks()) | set(layer.shape.removed_blocks())
        for kind in layer_plan.removed_blocks():
            block = blocks[kind]
            remove_block(module, block.path, block.outputs, layer.index if block.caches else None)
        if "attention" not in gone:
            removed = layer_plan.removed_query_heads(layer.shape.attention)
            kept_heads = [h for h in range(layer.shape.attention.num_heads) if h not in removed]
            graph.spec.rewrite_attention(module, new_shape.attention, kept_heads)
        if "mlp" not in gone:
            graph.spec.rewrite_mlp(module, new_shape.mlp_width)


def bias_shifts(plan: Plan, model: nn.Module, graph: Graph) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(bias, W[:, removed] @ mean) for each entry of `plan.compensation` (see adaprune.compensation).

    Every entry is checked against the plan and the model first; nothing is changed here.
    """
    if not plan.compensation:
        return []
    shrunk = {path: (linear, _complement(kept, linear.weight.shape[1]))
              for path, linear, axis, kept in _pruned_positions(plan, graph, model) if axis == "in"}
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


def _block_path(graph: Graph, layer_path: str, kind: str) -> str:
    return f"{layer_path}.{graph.spec.removable_blocks()[kind].path}"


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
