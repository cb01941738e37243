"""Allocation: fused scores and a budget in, the units to remove out.

The budget is a fraction of the model's prunable parameters (the parameters some unit owns).
``uniform`` spreads it evenly over the eligible layers: each loses the same fraction of its
prunable parameters, attention first (whole units, rounded), the MLP making up the rest with a
kept width rounded to a hardware-friendly multiple. ``global`` ranks every unit of every
eligible layer in one list by normalised importance per parameter (see
`adaprune.global_allocation`); only it may remove whole attention or MLP blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigurationError
from .global_allocation import global_allocation
from .graph import Graph, LayerGraph
from .plan import LayerPlan
from .specs import ArchSpec

ATTENTION_UNITS = ("kv_groups", "query_heads")
BLOCK_UNITS = ("attention_blocks", "mlp_blocks")  # whole blocks: global allocation only
UNIT_CHOICES = ATTENTION_UNITS + ("channels",) + BLOCK_UNITS
UNIT_ALIASES = {"heads": ("kv_groups",), "blocks": BLOCK_UNITS}


def normalise_units(units: Iterable[str]) -> tuple[str, ...]:
    """Resolve aliases and check the unit choice ("heads" means whole KV groups, "blocks" both block kinds)."""
    if isinstance(units, str):
        units = units.split(",")
    resolved = []
    for name in units:
        for unit in UNIT_ALIASES.get(name, (name,)):
            if unit not in UNIT_CHOICES:
                raise ConfigurationError(f"Unknown unit {unit!r}. Choose among "
                                         f"{', '.join(UNIT_CHOICES + tuple(UNIT_ALIASES))}.")
            if unit not in resolved:
                resolved.append(unit)
    if not resolved:
        raise ConfigurationError("units is empty; choose at least one of kv_groups/heads, query_heads, channels.")
    if all(u in resolved for u in ATTENTION_UNITS):
        raise ConfigurationError("Choose kv_groups (whole groups) or query_heads (heads within groups), not both.")
    return tuple(resolved)


def eligible_layers(num_layers: int, layers: Iterable[int] | str | None) -> list[int]:
    """Layer indices that may be pruned. Accepts indices (negative count from the end) or "start:stop"."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, str):
        try:
            parts = [int(p) if p.strip() else None for p in layers.split(":")]
            return list(range(num_layers))[slice(*parts)]
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"layers={layers!r} is not a 'start:stop' range of layer indices.") from error
    chosen = []
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ConfigurationError(f"layers= names layer {index}, but the model has {num_layers} layers.")
        chosen.append(index % num_layers)
    return sorted(set(chosen))


def check_units(strategy: str, units: Sequence[str], spec: ArchSpec) -> None:
    """Refuse, before any work, units that the strategy or the model family cannot honour."""
    blocks = [unit for unit in units if unit in BLOCK_UNITS]
    if blocks and strategy != "global":
        raise ConfigurationError(f"Whole blocks (units {', '.join(blocks)}) are only removed by allocation='global', "
                                 f"not {strategy!r}: choose allocation='global' or drop 'blocks' from units.")
    for unit in blocks:
        kind = unit.removesuffix("_blocks")
        if kind not in spec.removable_blocks():
            raise ConfigurationError(f"The {spec.name} family cannot run without its {kind} block (its spec "
                                     f"declares no {kind}_block); drop {unit!r} (or 'blocks') from units.")


@dataclass(frozen=True)
class Budget:
    ratio: float
    units: tuple[str, ...]
    layers: list[int]
    multiple: int = 8


def uniform(graph: Graph, scores: dict[str, list[torch.Tensor]], budget: Budget) -> list[LayerPlan]:
    """Every eligible layer loses the same fraction of its prunable parameters."""
    if any(unit in BLOCK_UNITS for unit in budget.units):
        raise ConfigurationError("Uniform allocation does not remove whole blocks; use allocation='global'.")
    sizes = [_layer_size(layer) for layer in graph]
    eligible_size = sum(sizes[i] for i in budget.layers)
    if not budget.layers or eligible_size == 0:
        raise ConfigurationError("No eligible layer to prune; widen layers=.")
    fraction = budget.ratio * sum(sizes) / eligible_size
    if fraction >= 1.0:
        raise ConfigurationError(
            f"Removing {budget.ratio:.0%} of the prunable parameters from only {len(budget.layers)} eligible "
            f"layers would empty them ({fraction:.0%} each); lower the ratio or allow more layers.")
    plans = [LayerPlan(i) for i in range(len(graph))]
    for i in budget.layers:
        if sizes[i]:  # 0: both blocks of the layer are already gone
            _prune_layer(graph.layers[i], plans[i], scores, fraction * sizes[i], budget)
    return plans


def _layer_size(layer: LayerGraph) -> int:
    return int(layer.unit_param_counts("kv_group").sum() + layer.unit_param_counts("channel").sum())


def lowest(scores: torch.Tensor, count: int, allowed: Sequence[int] | None = None) -> list[int]:
    """Indices of the `count` lowest scores (ties broken by index), among `allowed` if given."""
    candidates = list(range(len(scores))) if allowed is None else list(allowed)
    order = sorted(candidates, key=lambda i: (float(scores[i]), i))
    return sorted(order[:count])


def _prune_layer(layer: LayerGraph, plan: LayerPlan, scores, target: float, budget: Budget) -> None:
    attention = layer.shape.attention
    total = _layer_size(layer)
    fraction = target / total
    removed = 0
    if not attention.num_kv_heads:  # the attention block is already gone
        pass
    elif "kv_groups" in budget.units:
        count = min(round(fraction * attention.num_kv_heads), attention.num_kv_heads - 1)
        plan.remove_kv_groups = lowest(scores["kv_group"][layer.index], count)
        removed += int(layer.unit_param_counts("kv_group")[plan.remove_kv_groups].sum())
    elif "query_heads" in budget.units:
        per_group = attention.heads_per_group
        count = min(round(fraction * per_group), per_group - 1)
        head_scores = scores["head"][layer.index]
        for g in range(attention.num_kv_heads):
            plan.remove_heads += lowest(head_scores, count, range(g * per_group, (g + 1) * per_group))
        removed += int(layer.unit_param_counts("head")[plan.remove_heads].sum())
    if "channels" in budget.units and layer.shape.mlp_width:  # 0: the MLP block is already gone
        per_channel = int(layer.unit_param_counts("channel")[0])
        width = layer.shape.mlp_width
        wanted = max(target - removed, 0.0) / per_channel
        kept = round_kept(width - wanted, width, budget.multiple)
        plan.remove_channels = lowest(scores["channel"][layer.index], width - kept)


def round_kept(kept: float, width: int, multiple: int) -> int:
    """A kept width rounded to a multiple of `multiple`, within [1, width]."""
    if multiple > 1 and width >= multiple:
        kept = multiple * round(kept / multiple)
        return int(min(max(kept, multiple), width))
    return int(min(max(round(kept), 1), width))


STRATEGIES: dict[str, Callable[[Graph, dict[str, list[torch.Tensor]], Budget], list[LayerPlan]]] = {
    "uniform": uniform,
    "global": global_allocation,
}


def allocate(strategy: str, graph: Graph, scores: dict[str, list[torch.Tensor]], budget: Budget) -> list[LayerPlan]:
    if strategy not in STRATEGIES:
        raise ConfigurationError(f"Unknown allocation {strategy!r}. Available: {', '.join(sorted(STRATEGIES))}.")
    return STRATEGIES[strategy](graph, scores, budget)
