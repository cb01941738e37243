"""Uniform allocation: every eligible layer loses the same fraction of its prunable parameters.

Attention goes first, in whole units (rounded); the MLP makes up the rest of the layer's share,
its kept width rounded to a hardware-friendly multiple. The layers keep one shape, so the stock
config describes the pruned model and plain `from_pretrained` reloads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigurationError
from ..hookspecs import hookimpl
from ..plan import LayerPlan
from ..units.table import LayerUnits, UnitTable
from ..vocabulary import Level, UnitKind
from .base import AllocationScores, Allocator
from .budget import (
    Budget,
    channel_chunks,
    kept_widths,
    removable_heads_per_group,
    removable_kv_groups,
    round_kept,
)

#: How far the achieved fraction may miss the ratio (absolute) before uniform allocation refuses.
TOLERANCE = 0.02


def lowest(scores: torch.Tensor, count: int, allowed: Sequence[int] | None = None) -> list[int]:
    """Indices of the `count` lowest scores (ties broken by index), among `allowed` if given."""
    candidates = list(range(len(scores))) if allowed is None else list(allowed)
    order = sorted(candidates, key=lambda i: (float(scores[i]), i))
    return sorted(order[:count])


class UniformAllocator(Allocator):
    name = "uniform"
    fixed_counts = True

    def allocate(self, units: UnitTable, scores: AllocationScores, budget: Budget) -> list[LayerPlan]:
        sizes = [layer.prunable_size() for layer in units]
        eligible_size = sum(sizes[i] for i in budget.layers)
        if not budget.layers or eligible_size == 0:
            raise ConfigurationError("No eligible layer to prune; widen layers=.")
        fraction = budget.ratio * sum(sizes) / eligible_size
        if fraction >= 1.0:
            raise ConfigurationError(
                f"Removing {budget.ratio:.0%} of the prunable parameters from only {len(budget.layers)} eligible "
                f"layers would empty them ({fraction:.0%} each); lower the ratio or allow more layers.")
        plans = [LayerPlan(i) for i in range(len(units))]
        for i in budget.layers:
            if sizes[i]:  # 0: both blocks of the layer are already gone
                _prune_layer(units.layers[i], plans[i], scores.units, fraction * sizes[i], budget)
        _check_reached(units, plans, budget)
        return plans


def _prune_layer(layer: LayerUnits, plan: LayerPlan, scores, target: float, budget: Budget) -> None:
    attention = layer.shape.attention
    fraction = target / layer.prunable_size()
    removed = 0
    if not attention.num_kv_heads:  # the attention block is already gone
        pass
    elif UnitKind.KV_GROUPS in budget.units:
        count = min(round(fraction * attention.num_kv_heads), removable_kv_groups(layer.shape))
        plan.remove_kv_groups = lowest(scores[Level.KV_GROUP][layer.index], count)
        removed += int(layer.unit_param_counts(Level.KV_GROUP)[plan.remove_kv_groups].sum())
    elif UnitKind.QUERY_HEADS in budget.units:
        per_group = attention.heads_per_group
        count = min(round(fraction * per_group), removable_heads_per_group(layer.shape))
        head_scores = scores[Level.HEAD][layer.index]
        for g in range(attention.num_kv_heads):
            plan.remove_heads += lowest(head_scores, count, range(g * per_group, (g + 1) * per_group))
        removed += int(layer.unit_param_counts(Level.HEAD)[plan.remove_heads].sum())
    if UnitKind.CHANNELS in budget.units and layer.shape.mlp_width:  # 0: the MLP block is already gone
        per_channel = int(layer.unit_param_counts(Level.CHANNEL)[0])
        width = layer.shape.mlp_width
        wanted = max(target - removed, 0.0) / per_channel
        kept = round_kept(width - wanted, width, budget.multiple)
        plan.remove_channels = lowest(scores[Level.CHANNEL][layer.index], width - kept)


def _check_reached(units: UnitTable, plans: list[LayerPlan], budget: Budget) -> None:
    """Refuse a result that misses the ratio by more than half its coarsest step: floors held too much
    back, or whole units are too coarse for the ratio."""
    prunable = units.prunable_count()
    achieved = units.count_removed(plans) / prunable
    eligible = [units.layers[i] for i in budget.layers if units.layers[i].prunable_size()]
    step = max((_largest_step(layer, budget) / layer.prunable_size() for layer in eligible), default=0.0)
    if abs(achieved - budget.ratio) <= TOLERANCE + step / 2:
        return
    kinds = ", ".join(budget.units)
    capacity = sum(_removable(layer, budget) for layer in eligible) / prunable
    if budget.ratio > capacity:
        raise ConfigurationError(
            f"Uniform allocation with units {kinds} can remove at most {capacity:.1%} of the prunable parameters, "
            f"less than the {budget.ratio:.1%} asked (each layer keeps one KV group, one head per group and "
            f"{budget.multiple} channels). Lower the ratio to at most {capacity:.1%}, allow more layers, add "
            "units, or use allocation='global'.")
    raise ConfigurationError(
        f"Uniform allocation with units {kinds} removes {achieved:.1%} of the prunable parameters, not the "
        f"{budget.ratio:.1%} asked: whole units are too coarse for this ratio. Add 'channels' to units, ask for "
        f"a ratio near {achieved:.1%}, or use allocation='global'.")


def _largest_step(layer: LayerUnits, budget: Budget) -> int:
    """Parameters of the largest single thing uniform allocation removes from `layer` at once."""
    steps = [0]
    if layer.shape.attention.num_kv_heads and UnitKind.KV_GROUPS in budget.units:
        steps.append(int(layer.unit_param_counts(Level.KV_GROUP).max()))
    elif layer.shape.attention.num_kv_heads and UnitKind.QUERY_HEADS in budget.units:
        steps.append(int(layer.unit_param_counts(Level.HEAD).max()) * layer.shape.attention.num_kv_heads)
    if layer.shape.mlp_width and UnitKind.CHANNELS in budget.units:
        chunk = max(channel_chunks(layer.shape.mlp_width, budget.multiple), default=1)
        steps.append(chunk * int(layer.unit_param_counts(Level.CHANNEL)[0]))
    return max(steps)


def _removable(layer: LayerUnits, budget: Budget) -> int:
    """The most uniform allocation can remove from `layer`, down to the floors."""
    shape, total = layer.shape, 0
    if shape.attention.num_kv_heads and UnitKind.KV_GROUPS in budget.units:
        total += int(layer.unit_param_counts(Level.KV_GROUP)[0]) * removable_kv_groups(shape)
    elif shape.attention.num_kv_heads and UnitKind.QUERY_HEADS in budget.units:
        total += int(layer.unit_param_counts(Level.HEAD)[0]) * removable_heads_per_group(shape) \
            * shape.attention.num_kv_heads
    if shape.mlp_width and UnitKind.CHANNELS in budget.units:
        smallest = kept_widths(shape.mlp_width, budget.multiple)[-1]
        total += int(layer.unit_param_counts(Level.CHANNEL)[0]) * (shape.mlp_width - smallest)
    return total


@hookimpl
def adaprune_allocations():
    return [UniformAllocator]
