"""The physical applier: smaller Linear layers, removed blocks replaced by stand-ins, rewritten attributes.

The same plan through `mask` and `slice_model` gives the same logits: both walk the same
projection layouts (`positions.pruned_positions`) and add the same bias shifts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PlanError
from ..plan import Plan
from ..specs.base import set_submodule
from ..units.table import UnitTable
from ..vocabulary import BlockKind
from .compensation import bias_shifts
from .mask import is_masked
from .positions import check, pruned_positions
from .removed_block import remove_block


def slice_model(plan: Plan, model: nn.Module, units: UnitTable, shift_biases: bool = True) -> None:
    """Physically remove what the plan removes: smaller Linear layers, rewritten attributes.

    `shift_biases=False` skips the plan's bias compensation, for a model whose mask added it already.
    The caller updates the config afterwards (`adaprune.export.config.sync_config`).
    """
    if is_masked(model):
        raise PlanError("The model is masked (apply(plan, mode='mask')): restore() it before slicing it.")
    check(plan, model, units)
    shifts = bias_shifts(plan, model, units) if shift_biases else []  # all checked before the first is added
    with torch.no_grad():
        for bias, delta in shifts:
            bias.add_(delta.to(device=bias.device, dtype=bias.dtype))
    replacements = [(path, _sliced_linear(linear, axis, kept))
                    for path, linear, axis, kept in pruned_positions(plan, units, model)]
    for path, linear in replacements:
        set_submodule(model, path, linear)
    spec = units.spec
    blocks = spec.removable_blocks()
    for layer_plan, layer, module in zip(plan.layers, units, spec.decoder_layers(model)):
        new_shape = layer_plan.pruned_shape(layer.shape)
        gone = set(layer_plan.removed_blocks()) | set(layer.shape.removed_blocks())
        for kind in layer_plan.removed_blocks():
            block = blocks[kind]
            remove_block(module, block.path, block.outputs, layer.index if block.caches else None)
        if BlockKind.ATTENTION not in gone:
            removed = layer_plan.removed_query_heads(layer.shape.attention)
            kept_heads = [h for h in range(layer.shape.attention.num_heads) if h not in removed]
            spec.rewrite_attention(module, new_shape.attention, kept_heads)
        if BlockKind.MLP not in gone:
            spec.rewrite_mlp(module, new_shape.mlp_width)


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
