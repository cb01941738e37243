"""Global allocation: one ranking of every removable unit of every eligible layer.

A unit's fused score is normalised per site (one layer x one level, divided by the site's
mean), so that heads, KV groups and channels of different layers compare on one scale, then
divided by the parameters the unit carries, normalised the same way (its count over the site's
mean count): importance per parameter, 1 for the average unit of every site. Normalising the
parameter counts too keeps the ranking from favouring big units: a KV group and a channel that
are each average in their site cost the same per parameter.

Per-site normalisation also removes what the raw scores know about which *layer* matters more,
so each site is then weighed by its block's importance relative to the same block in the other
layers (`adaprune.scoring.candidates.block_importance`: each raw candidate's per-layer total over
its mean across layers).
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
* whole blocks (units "attention_blocks", "mlp_blocks") rank in the same list, scored by their
  block importance.

Entries of one layer that must go in order (rounds, chunks) are only taken in order, and an entry
that would overshoot the budget by more than it would fall short is passed over for a smaller
one, so the total lands near the budget.

Option `max_layer_fraction`: no layer loses more than this fraction of its prunable parameters
(a whole block that goes counts whole); an entry that would pass the cap is passed over. The
scores are first-order estimates of what one unit costs, which say less the more of a block
goes at once: at 50 % the list takes about 90 % of the MLPs of SmolLM2-135M's middle layers. On the
calibration hold-out a cap of 0.6 helped (94.3 -> 84.0) but 0.65 and 0.5 hurt (107.9, 117.0): no
reliable gain over the spread between neighbouring plans (benchmarks/holdout_selection.py
allocation, docs/pipeline.md §6). Off by default.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigurationError
from ..hookspecs import hookimpl
from ..plan import LayerPlan
from ..scoring.candidates import mean_normalised
from ..units.table import LayerUnits, UnitTable
from ..vocabulary import BLOCK_KINDS, BlockKind, Level, UnitKind
from .base import AllocationScores, Allocator
from .budget import Budget, channel_chunks, removable_heads_per_group, removable_kv_groups

# The kinds of entries of the list besides whole blocks, and the block each belongs to.
HEAD_ROUND, CHANNEL_CHUNK = "head_round", "channel_chunk"
BLOCK_OF = {Level.KV_GROUP: BlockKind.ATTENTION, HEAD_ROUND: BlockKind.ATTENTION, CHANNEL_CHUNK: BlockKind.MLP}


@dataclass
class Entry:
    """One line of the global list: a KV group, a round of heads, a chunk of channels, or a whole block."""

    cost: float  # normalised importance over normalised parameters: the lowest goes first
    layer: int
    kind: str  # Level.KV_GROUP, HEAD_ROUND, CHANNEL_CHUNK, or a BlockKind
    step: int  # place in its layer's sequence of rounds or chunks (0 otherwise)
    indices: list[int]
    params: int


def per_site(scores: torch.Tensor) -> torch.Tensor:
    """Scores over their site's mean; all ones where they carry no ranking."""
    normalised = mean_normalised(scores.flatten())
    return normalised if normalised is not None else torch.ones_like(scores.flatten(), dtype=torch.float64)


class GlobalAllocator(Allocator):
    """Remove the units that carry the least normalised importance per parameter, across all eligible layers.

    The scores' block importance weighs each layer's sites, and scores whole blocks where they may go;
    without it every layer weighs the same.
    """

    name = "global"
    removes_blocks = True

    def __init__(self, max_layer_fraction: float | None = None) -> None:
        if max_layer_fraction is not None and (isinstance(max_layer_fraction, bool) or not isinstance(
                max_layer_fraction, (int, float)) or not 0 < max_layer_fraction <= 1):
            raise ConfigurationError(f"global allocation's max_layer_fraction must be a number in (0, 1] (the most "
                                     f"of a layer's prunable parameters that may go) or None, got "
                                     f"{max_layer_fraction!r}.")
        self.max_layer_fraction = None if max_layer_fraction is None else float(max_layer_fraction)

    @property
    def options(self) -> dict[str, float]:
        return {} if self.max_layer_fraction is None else {"max_layer_fraction": self.max_layer_fraction}

    def allocate(self, units: UnitTable, scores: AllocationScores, budget: Budget) -> list[LayerPlan]:
        prunable = units.prunable_count()
        target = budget.ratio * prunable
        cap = self.max_layer_fraction
        limit = {i: cap * units.layers[i].prunable_size() if cap is not None else math.inf for i in budget.layers}
        if sum(limit.values()) < target:
            raise ConfigurationError(
                f"max_layer_fraction={cap:g} lets the eligible layers lose at most "
                f"{sum(limit.values()) / max(prunable, 1):.1%} of the prunable parameters, less than ratio "
                f"{budget.ratio:g}. Raise max_layer_fraction, lower the ratio, or allow more layers (layers=).")
        taken = dict.fromkeys(limit, 0)
        block_sizes = {kind: [layer.block_params[kind] for layer in units if kind in layer.block_params]
                       for kind in BLOCK_KINDS}
        mean_block = {kind: sum(sizes) / len(sizes) for kind, sizes in block_sizes.items() if sizes}
        entries = [entry for i in budget.layers for entry in _entries(units.layers[i], scores, budget, mean_block)]
        capacity = _capacity(entries, units)
        if capacity < target:
            raise ConfigurationError(
                f"With units {', '.join(budget.units)} the eligible layers can lose at most "
                f"{capacity / max(prunable, 1):.1%} of the prunable parameters (every layer keeps one KV group, one "
                "head per group and one channel multiple, and the model one block of each kind), less than ratio "
                f"{budget.ratio:g}. Lower the ratio, allow more layers (layers=), or add units (such as 'blocks').")
        state = _State(units)
        removed = 0
        for entry in sorted(entries, key=lambda e: (e.cost, e.layer, e.step, e.kind)):
            if removed >= target:
                break
            gain = state.gain(entry)
            # Pass over an entry that would overshoot by more than it leaves short: a smaller one may fit.
            if gain is None or removed + gain - target > target - removed:
                continue
            if taken[entry.layer] + gain > limit[entry.layer]:  # the layer's cap (max_layer_fraction)
                continue
            state.take(entry)
            removed += gain
            taken[entry.layer] += gain
        return state.finish()


def _entries(layer: LayerUnits, scores: AllocationScores, budget: Budget,
             mean_block: dict[BlockKind, float]) -> list[Entry]:
    """All entries of one layer that the chosen units allow."""
    i, attention, width = layer.index, layer.shape.attention, layer.shape.mlp_width
    weight = {kind: scores.layer_weight(kind, i) for kind in BLOCK_KINDS}
    entries: list[Entry] = []
    if attention.num_kv_heads and UnitKind.KV_GROUPS in budget.units:
        site = weight[BlockKind.ATTENTION] * per_site(scores.units[Level.KV_GROUP][i])
        params = layer.unit_param_counts(Level.KV_GROUP)
        shares = params / params.double().mean()
        entries += [Entry(float(site[g] / shares[g]), i, Level.KV_GROUP, 0, [g], int(params[g]))
                    for g in range(attention.num_kv_heads)]
    elif attention.num_kv_heads and UnitKind.QUERY_HEADS in budget.units:
        site = weight[BlockKind.ATTENTION] * per_site(scores.units[Level.HEAD][i])
        params = layer.unit_param_counts(Level.HEAD)
        shares = params / params.double().mean()
        per_group = attention.heads_per_group
        groups = [sorted(range(g * per_group, (g + 1) * per_group), key=lambda h: (float(site[h]), h))
                  for g in range(attention.num_kv_heads)]
        for step in range(removable_heads_per_group(layer.shape)):  # the last head of every group stays
            heads = sorted(group[step] for group in groups)
            entries.append(Entry(float(site[heads].sum() / shares[heads].sum()), i, HEAD_ROUND, step, heads,
                                 int(params[heads].sum())))
    if width and UnitKind.CHANNELS in budget.units:
        # Channels of a layer all carry the same parameters: their normalised parameter count is 1.
        site = weight[BlockKind.MLP] * per_site(scores.units[Level.CHANNEL][i])
        per_channel = int(layer.unit_param_counts(Level.CHANNEL)[0])
        chunks = _lowest_first(site, channel_chunks(width, budget.multiple))
        entries += [Entry(mean, i, CHANNEL_CHUNK, step, chunk, len(chunk) * per_channel)
                    for step, (chunk, mean) in enumerate(chunks)]
    for kind in BLOCK_KINDS:
        if kind not in layer.block_params or not any(unit.block is kind for unit in budget.units):
            continue
        relative = scores.blocks.get(kind)
        if relative is None:
            raise ConfigurationError(f"Whole {kind} blocks need the layers' block importance (AllocationScores."
                                     "blocks, from adaprune.scoring.candidates.block_importance); Pruner.plan() "
                                     "adds it.")
        if relative[i] is not None and math.isfinite(relative[i]):
            # The site of a block is that block across layers: importance relative to the mean
            # block, over parameters relative to the mean block's.
            params = layer.block_params[kind]
            entries.append(Entry(relative[i] / (params / mean_block[kind]), i, kind, 0, [], params))
    return entries


def _lowest_first(site: torch.Tensor, sizes: list[int]) -> list[tuple[list[int], float]]:
    """The site's positions from the lowest score up (ties by position), cut into chunks of `sizes`:
    each chunk's positions in ascending order, with the mean of their scores.

    Runs of chunks of one size are one matrix, a row per chunk, sorted and averaged in one call each
    (a row's mean is the chunk's own, bit for bit: tests/test_allocation_chunks.py); one call per
    chunk made the global allocation cost ~2 s at 7B, and the adaptive fusion allocates at every
    training step."""
    order = torch.sort(site, stable=True).indices
    chunks: list[tuple[list[int], float]] = []
    start = 0
    for size, run in itertools.groupby(sizes):
        count = len(list(run))
        rows = order[start:start + size * count].view(count, size).sort(dim=1).values
        start += size * count
        chunks += zip(rows.tolist(), site[rows].mean(dim=1).tolist())
    return chunks


def _capacity(entries: list[Entry], units: UnitTable) -> int:
    """The most the entries can remove: whole blocks where allowed, else units down to their floors.

    The model keeps one block of each kind: where every layer's block of a kind could go whole, the
    one cheapest to keep (the least left once its units are pruned to their floors) stays.
    """
    whole = {(e.layer, e.kind): e.params for e in entries if isinstance(e.kind, BlockKind)}
    by_units: dict[tuple[int, BlockKind], int] = {}
    groups: dict[int, list[int]] = {}
    for e in entries:
        if e.kind is Level.KV_GROUP:
            groups.setdefault(e.layer, []).append(e.params)
        elif e.kind in BLOCK_OF:
            key = (e.layer, BLOCK_OF[e.kind])
            by_units[key] = by_units.get(key, 0) + e.params
    for layer, params in groups.items():  # one KV group stays
        by_units[(layer, BlockKind.ATTENTION)] = by_units.get((layer, BlockKind.ATTENTION), 0) + sum(params) - min(params)
    total = sum(whole.get(key, removable) for key, removable in by_units.items())
    total += sum(params for key, params in whole.items() if key not in by_units)
    for kind in BLOCK_KINDS:
        having = [layer.index for layer in units if kind in layer.block_params]
        if having and all((i, kind) in whole for i in having):
            total -= min(whole[(i, kind)] - by_units.get((i, kind), 0) for i in having)
    return total


class _State:
    """What the greedy pass has taken so far, and the rules for what it may take next."""

    def __init__(self, units: UnitTable):
        self.units = units
        self.plans = [LayerPlan(i) for i in range(len(units))]
        self.steps: dict[tuple[int, str], int] = {}  # (layer, kind) -> rounds or chunks taken
        self.unit_params: dict[tuple[int, BlockKind], int] = {}  # (layer, block) -> taken by its units

    def gain(self, entry: Entry) -> int | None:
        """Parameters taking `entry` would add, or None if it may not be taken now."""
        plan = self.plans[entry.layer]
        if isinstance(entry.kind, BlockKind):
            if entry.kind in plan.removed_blocks() or self._last_block(entry.kind):
                return None
            return entry.params - self.unit_params.get((entry.layer, entry.kind), 0)
        if BLOCK_OF[entry.kind] in plan.removed_blocks():
            return None
        if entry.kind is Level.KV_GROUP:
            shape = self.units.layers[entry.layer].shape
            return entry.params if len(plan.remove_kv_groups) < removable_kv_groups(shape) else None
        return entry.params if self.steps.get((entry.layer, entry.kind), 0) == entry.step else None

    def _last_block(self, kind: BlockKind) -> bool:
        """Whether only one block of `kind` is left in the model (it must stay)."""
        left = sum(1 for layer, plan in zip(self.units, self.plans)
                   if kind in layer.block_params and kind not in plan.removed_blocks())
        return left <= 1

    def take(self, entry: Entry) -> None:
        plan = self.plans[entry.layer]
        if entry.kind is BlockKind.ATTENTION:
            plan.remove_attention, plan.remove_kv_groups, plan.remove_heads = True, [], []
        elif entry.kind is BlockKind.MLP:
            plan.remove_mlp, plan.remove_channels = True, []
        else:
            target = {Level.KV_GROUP: plan.remove_kv_groups, HEAD_ROUND: plan.remove_heads,
                      CHANNEL_CHUNK: plan.remove_channels}[entry.kind]
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


@hookimpl
def adaprune_allocations():
    return [GlobalAllocator]
