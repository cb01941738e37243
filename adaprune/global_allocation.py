"""Global allocation: one ranking of every removable unit of every eligible layer.

A unit's fused score is normalised per site (one layer x one level, divided by the site's
mean), so that heads, KV groups and channels of different layers compare on one scale, then
divided by the parameters the unit carries, normalised the same way (its count over the site's
mean count): importance per parameter, 1 for the average unit of every site. Normalising the
parameter counts too keeps the ranking from favouring big units: a KV group and a channel that
are each average in their site cost the same per parameter.

Per-site normalisation also removes what the raw scores know about which *layer* matters more,
so each site is then weighed by its block's importance relative to the same block in the other
layers (`block_scores`: each raw candidate's per-layer total over its mean across layers).
Without that weight every layer's average unit costs the same, and at 50 % the list cut as deep
into the first layers as into the middle ones (validation perplexity on a held-out part of the
calibration split, SmolLM2-135M, coarse Taylor: 2388 unweighted, 484 weighted, 1041 uniform).
Units leave from the bottom of that one list until the budget (ratio x prunable parameters) is met.

The structural rules hold by the shape of the list, so nothing is rounded afterwards:

* query heads go in rounds, one head from every KV group of a layer at once (the lowest left
  in each), so every group keeps the same number, at least one;
* MLP channels go in chunks: the first takes the width down to a multiple of `multiple`, each
  next one `multiple` more, so a kept width is always a multiple (at least one multiple stays);
* a layer keeps at least one KV group, unless its whole attention block goes;
* whole blocks (units "attention_blocks", "mlp_blocks") rank in the same list (see `block_scores`).

Entries of one layer that must go in order (rounds, chunks) are only taken in order, and an entry
that would overshoot the budget by more than it would fall short is passed over for a smaller
one, so the total lands near the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ConfigurationError
from .graph import Graph, LayerGraph
from .plan import LayerPlan

if TYPE_CHECKING:  # allocation imports this module; Budget is only a type here
    from .allocation import Budget

# Which block a unit entry belongs to, and the levels whose summed scores stand for a block.
BLOCK_OF = {"kv_group": "attention", "head_round": "attention", "channel_chunk": "mlp"}
BLOCK_LEVELS = {"attention": ("kv_group", "head"), "mlp": ("channel",)}


@dataclass
class Entry:
    """One line of the global list: a unit, a round of heads, a chunk of channels, or a block."""

    cost: float  # normalised importance over normalised parameters: the lowest goes first
    layer: int
    kind: str  # "kv_group", "head_round", "channel_chunk", "attention" or "mlp"
    step: int  # place in its layer's sequence of rounds or chunks (0 otherwise)
    indices: list[int]
    params: int


def per_site(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their mean magnitude; all ones when they carry no scale (zero, not finite)."""
    scores = scores.detach().to(torch.float64).flatten()
    mean = scores.abs().mean() if scores.numel() else torch.tensor(0.0)
    if not bool(torch.isfinite(scores).all()) or float(mean) <= 0:
        return torch.ones_like(scores)
    return scores / mean


def block_scores(candidates: Mapping[str, Mapping[str, list[torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """Each layer's attention and MLP block importance, comparable across layers.

    Fused unit scores are normalised per site and so cannot say which layer matters more; the raw
    candidate scores (estimator x granularity) can. A block's raw importance is the sum of its
    units' scores at its coarsest scored level; per candidate it is divided by the mean over the
    layers that have the block (the mean block scores 1), then averaged over candidates. Returns
    `{"attention_block": [tensor([r]) per layer], "mlp_block": [...]}`; an empty tensor for a layer
    that no longer has the block.
    """
    result: dict[str, list[torch.Tensor]] = {}
    for kind, levels in BLOCK_LEVELS.items():
        relative = []
        for by_level in candidates.values():
            level = next((level for level in levels if level in by_level), None)
            if level is None:
                continue
            totals = torch.tensor([float(t.detach().to(torch.float64).abs().sum()) if t.numel() else math.nan
                                   for t in by_level[level]], dtype=torch.float64)
            present = totals[~torch.isnan(totals)]
            if present.numel() and bool(torch.isfinite(present).all()) and float(present.mean()) > 0:
                relative.append(totals / present.mean())
        if relative:
            mean = torch.stack(relative).mean(0)
            result[f"{kind}_block"] = [mean[i:i + 1] if not math.isnan(mean[i]) else mean[:0] for i in range(len(mean))]
    return result


def global_allocation(graph: Graph, scores: Mapping[str, list[torch.Tensor]], budget: Budget) -> list[LayerPlan]:
    """Remove the units that carry the least normalised importance per parameter, across all eligible layers.

    `scores` holds the fused scores per level and, from `block_scores`, each layer's relative
    block importance (`"attention_block"`, `"mlp_block"`): the weight of the layer's sites, and the
    score of a whole block where blocks may go. Without them every layer weighs the same.
    """
    prunable = sum(_prunable_size(layer) for layer in graph)
    target = budget.ratio * prunable
    block_sizes = {kind: [layer.block_params[kind] for layer in graph if kind in layer.block_params]
                   for kind in BLOCK_LEVELS}
    mean_block = {kind: sum(sizes) / len(sizes) for kind, sizes in block_sizes.items() if sizes}
    entries = [entry for i in budget.layers for entry in _entries(graph.layers[i], scores, budget, mean_block)]
    capacity = _capacity(graph, entries)
    if capacity < target:
        raise ConfigurationError(
            f"With units {', '.join(budget.units)} the eligible layers can lose at most "
            f"{capacity / max(prunable, 1):.1%} of the prunable parameters, less than ratio {budget.ratio:g}. "
            "Lower the ratio, allow more layers (layers=), or add units (such as 'blocks').")
    state = _State(graph)
    removed = 0
    for entry in sorted(entries, key=lambda e: (e.cost, e.layer, e.step, e.kind)):
        if removed >= target:
            break
        gain = state.gain(entry)
        # Pass over an entry that would overshoot by more than it leaves short: a smaller one may fit.
        if gain is None or removed + gain - target > target - removed:
            continue
        state.take(entry)
        removed += gain
    return state.finish()


def _prunable_size(layer: LayerGraph) -> int:
    return int(layer.unit_param_counts("kv_group").sum() + layer.unit_param_counts("channel").sum())


def _entries(layer: LayerGraph, scores: Mapping[str, list[torch.Tensor]], budget: Budget,
             mean_block: Mapping[str, float]) -> list[Entry]:
    """All entries of one layer that the chosen units allow."""
    i, attention, width = layer.index, layer.shape.attention, layer.shape.mlp_width
    weight = {kind: _layer_weight(scores, kind, i) for kind in BLOCK_LEVELS}
    entries: list[Entry] = []
    if attention.num_kv_heads and "kv_groups" in budget.units:
        site, params = weight["attention"] * per_site(scores["kv_group"][i]), layer.unit_param_counts("kv_group")
        shares = params / params.double().mean()
        entries += [Entry(float(site[g] / shares[g]), i, "kv_group", 0, [g], int(params[g]))
                    for g in range(attention.num_kv_heads)]
    elif attention.num_kv_heads and "query_heads" in budget.units:
        site, params = weight["attention"] * per_site(scores["head"][i]), layer.unit_param_counts("head")
        shares = params / params.double().mean()
        per_group = attention.heads_per_group
        groups = [sorted(range(g * per_group, (g + 1) * per_group), key=lambda h: (float(site[h]), h))
                  for g in range(attention.num_kv_heads)]
        for step in range(per_group - 1):  # the last head of every group stays
            heads = sorted(group[step] for group in groups)
            entries.append(Entry(float(site[heads].sum() / shares[heads].sum()), i, "head_round", step, heads,
                                 int(params[heads].sum())))
    if width and "channels" in budget.units:
        # Channels of a layer all carry the same parameters: their normalised parameter count is 1.
        site, per_channel = weight["mlp"] * per_site(scores["channel"][i]), int(layer.unit_param_counts("channel")[0])
        order = sorted(range(width), key=lambda c: (float(site[c]), c))
        start = 0
        for step, size in enumerate(_chunk_sizes(width, budget.multiple)):
            chunk = sorted(order[start:start + size])
            start += size
            entries.append(Entry(float(site[chunk].mean()), i, "channel_chunk", step, chunk, size * per_channel))
    for kind in BLOCK_LEVELS:
        if f"{kind}_blocks" in budget.units and kind in layer.block_params:
            if f"{kind}_block" not in scores:
                raise ConfigurationError(f"Whole {kind} blocks need block scores (scores['{kind}_block'], from "
                                         "adaprune.global_allocation.block_scores); Pruner.plan() adds them.")
            relative = scores[f"{kind}_block"][i].reshape(-1)
            if relative.numel() and math.isfinite(float(relative[0])):
                # The site of a block is that block across layers: importance relative to the mean
                # block, over parameters relative to the mean block's.
                params = layer.block_params[kind]
                entries.append(Entry(float(relative[0]) / (params / mean_block[kind]), i, kind, 0, [], params))
    return entries


def _layer_weight(scores: Mapping[str, list[torch.Tensor]], kind: str, layer: int) -> float:
    """The layer's `kind` block importance relative to the other layers' (1 when unknown)."""
    relative = scores.get(f"{kind}_block")
    value = relative[layer].reshape(-1) if relative is not None else torch.empty(0)
    return float(value[0]) if value.numel() and math.isfinite(float(value[0])) and float(value[0]) > 0 else 1.0


def _chunk_sizes(width: int, multiple: int) -> list[int]:
    """Successive channel chunks: each leaves a width that `allocation.round_kept` would keep."""
    if multiple <= 1 or width < multiple:
        return [1] * (width - 1)
    first = [width % multiple] if width % multiple else []
    return first + [multiple] * (width // multiple - 1)


def _capacity(graph: Graph, entries: list[Entry]) -> int:
    """The most the entries can remove: whole blocks where allowed, else units down to their floors."""
    whole = {(e.layer, e.kind): e.params for e in entries if e.kind in ("attention", "mlp")}
    total = sum(whole.values())
    groups: dict[int, list[int]] = {}
    for e in entries:
        if e.kind in BLOCK_OF and (e.layer, BLOCK_OF[e.kind]) not in whole:
            if e.kind == "kv_group":
                groups.setdefault(e.layer, []).append(e.params)
            else:
                total += e.params
    return total + sum(sum(p) - min(p) for p in groups.values())  # one KV group stays


class _State:
    """What the greedy pass has taken so far, and the rules for what it may take next."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.plans = [LayerPlan(i) for i in range(len(graph))]
        self.steps: dict[tuple[int, str], int] = {}  # (layer, kind) -> rounds or chunks taken
        self.unit_params: dict[tuple[int, str], int] = {}  # (layer, block) -> taken by its units

    def gain(self, entry: Entry) -> int | None:
        """Parameters taking `entry` would add, or None if it may not be taken now."""
        plan = self.plans[entry.layer]
        if entry.kind in ("attention", "mlp"):
            if entry.kind in plan.removed_blocks():
                return None
            return entry.params - self.unit_params.get((entry.layer, entry.kind), 0)
        if BLOCK_OF[entry.kind] in plan.removed_blocks():
            return None
        if entry.kind == "kv_group":
            groups = self.graph.layers[entry.layer].shape.attention.num_kv_heads
            return entry.params if len(plan.remove_kv_groups) < groups - 1 else None
        return entry.params if self.steps.get((entry.layer, entry.kind), 0) == entry.step else None

    def take(self, entry: Entry) -> None:
        plan = self.plans[entry.layer]
        if entry.kind == "attention":
            plan.remove_attention, plan.remove_kv_groups, plan.remove_heads = True, [], []
        elif entry.kind == "mlp":
            plan.remove_mlp, plan.remove_channels = True, []
        else:
            target = {"kv_group": plan.remove_kv_groups, "head_round": plan.remove_heads,
                      "channel_chunk": plan.remove_channels}[entry.kind]
            target.extend(entry.indices)
            key = (entry.layer, BLOCK_OF[entry.kind])
            self.unit_params[key] = self.unit_params.get(key, 0) + entry.params
            self.steps[(entry.layer, entry.kind)] = entry.step + 1

    def finish(self) -> list[LayerPlan]:
        for plan in self.plans:
            plan.remove_kv_groups.sort()
            plan.remove_heads.sort()
            plan.remove_channels.sort()
        return self.plans
