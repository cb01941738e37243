"""Learned: one scalar gate per unit, trained to keep the model's own outputs; the score is the gate.

Every unit of every level gets a gate, starting just below 1. A gate multiplies the unit's input
columns of the "in" projections (the o-projection columns of a head, the down-projection column
of a channel) through forward pre-hooks, so a gate at 0 is the unit removed; a column's factor
is the product of its units' gates (a KV group's gate and its head's gate). Modules are never
edited, and the hooks are removed afterwards.

Training runs a bounded number of steps, each on `batch_size` rows of the calibration batches
(in an order drawn from `seed`), and minimises KL(dense || gated), the divergence of the gated model's next-token
distribution from the frozen dense model's, plus `sparsity` times the sum of the gates, with Adam;
gates are kept in [0, 1]. Two choices make a few steps enough:

* the KL gradient is divided by its mean magnitude over all gates of a level, so that `sparsity`
  reads as a ratio (1: every gate is pushed down as hard as the average one is pulled back),
  whatever the scale of the loss;
* Adam moves every gate by at most about `lr` a step. Plain gradient steps, normalised or not,
  throw the few units with a huge gradient (the massive-activation channels) far past 0 or 1 in
  one step, and a gate that lands on 0 is a catastrophic unit removed: on SmolLM2 that scored
  worse than random choice.

At the dense start the KL gradient is exactly zero, so the first step is taken without a pass:
the gates start at 1 - lr, as one Adam step on the penalty alone would leave them.

A unit's score is its mean effective gate over its columns: a channel's gate, a head's gate
times its KV group's, a KV group's gate times the mean of its heads'. Each step costs one forward
pass without gradients (the dense reference) and one with a backward pass through activations
(no weight gradients), on top of the shared calibration pass.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scoring.calibration import CalibrationStats
from ..units.gating import per_column, scaled_inputs
from ..units.model_state import frozen
from ..units.objectives import kl_to_teacher, next_token_log_probs
from ..units.table import UnitTable
from ..vocabulary import LEVELS, Level
from .base import Estimator, Scores
from ..hookspecs import hookimpl

#: gates[level][layer index] -> float64 tensor of one gate per unit
Gates = dict[Level, list[torch.Tensor]]
#: module path -> (level, layer index, owner of each input column)
Columns = dict[str, list[tuple[Level, int, torch.Tensor]]]


class LearnedGateEstimator(Estimator):
    name = "learned"
    needs = frozenset({"weights", "calibration_data"})

    def __init__(self, steps: int = 24, lr: float = 0.03, sparsity: float = 1.0, batch_size: int = 4,
                 seed: int = 0) -> None:
        for option, value in (("steps", steps), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"learned {option} must be a positive integer, got {value!r}")
        if not lr > 0 or not sparsity >= 0:
            raise ValueError(f"learned needs lr > 0 and sparsity >= 0, got lr={lr!r}, sparsity={sparsity!r}")
        self.steps, self.lr, self.sparsity = steps, float(lr), float(sparsity)
        self.batch_size, self.seed = batch_size, int(seed)

    @property
    def options(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "sparsity": self.sparsity, "batch_size": self.batch_size,
                "seed": self.seed}

    def score(self, model: nn.Module, units: UnitTable, stats: CalibrationStats) -> Scores:
        if not stats.batches:
            raise ValueError("the learned estimator needs the calibration batches (need 'calibration_data')")
        gates: Gates = {level: [torch.full((layer.num_units[level],), 1.0 - self.lr, dtype=torch.float64,
                                           requires_grad=True) for layer in units] for level in LEVELS}
        optimizer = torch.optim.Adam([gate for per_layer in gates.values() for gate in per_layer], lr=self.lr)
        columns = gated_columns(units)
        chunks = [chunk for batch in stats.batches for chunk in batch.split(self.batch_size)]
        order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(self.seed)).tolist()
        device = next(model.parameters()).device
        gating = {"on": False}
        factors = {path: (lambda _entries=entries: column_factor(_entries, gates) if gating["on"] else None)
                   for path, entries in columns.items()}
        with frozen(model), scaled_inputs(model, factors):
            for step in range(self.steps):
                ids = chunks[order[step % len(order)]].to(device)
                gating["on"] = False
                dense = next_token_log_probs(model, ids)
                gating["on"] = True
                kl_to_teacher(dense, model(input_ids=ids, use_cache=False).logits).backward()
                self._step(gates, optimizer)
        return {"coarse": unit_scores(units, columns, gates)}

    def _step(self, gates: Gates, optimizer: torch.optim.Optimizer) -> None:
        """One Adam step on KL (normalised per level) + sparsity * sum(gates), then back into [0, 1]."""
        with torch.no_grad():
            for per_layer in gates.values():
                grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in per_layer]
                scale = torch.cat(grads).abs().mean() if any(g.numel() for g in grads) else torch.tensor(0.0)
                for gate, grad in zip(per_layer, grads):
                    gate.grad = (grad / scale if scale > 0 else grad) + self.sparsity
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for per_layer in gates.values():
                for gate in per_layer:
                    gate.clamp_(0.0, 1.0)


def gated_columns(units: UnitTable) -> Columns:
    """The input columns each unit owns in the "in" projections, grouped by module."""
    columns: Columns = {}
    for layer in units:
        for level in LEVELS:
            for member in layer.input_members(level):  # weight columns; biases belong to rows
                columns.setdefault(member.module_path, []).append((level, layer.index, member.owner))
    return columns


def column_factor(entries: list[tuple[Level, int, torch.Tensor]], gates: Gates) -> torch.Tensor:
    """Each input column's factor: the product of the gates of the units owning it."""
    factor = None
    for level, layer_index, owner in entries:
        values = per_column(gates[level][layer_index], owner)
        factor = values if factor is None else factor * values
    return factor


def unit_scores(units: UnitTable, columns: Columns, gates: Gates) -> dict[Level, list[torch.Tensor]]:
    """A unit's mean effective gate over its columns (units without columns score 0)."""
    totals = {level: [torch.zeros(layer.num_units[level], dtype=torch.float64) for layer in units] for level in LEVELS}
    counts = {level: [torch.zeros_like(t) for t in per_layer] for level, per_layer in totals.items()}
    for entries in columns.values():
        factor = column_factor(entries, gates).detach()
        for level, layer_index, owner in entries:
            owned = owner >= 0
            totals[level][layer_index].index_add_(0, owner[owned], factor[owned])
            counts[level][layer_index].index_add_(0, owner[owned], torch.ones_like(factor[owned]))
    return {level: [t / c.clamp(min=1) for t, c in zip(totals[level], counts[level])] for level in LEVELS}


@hookimpl
def adaprune_estimators():
    return [LearnedGateEstimator]
