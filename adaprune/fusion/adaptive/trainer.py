"""Training the blend attention on a frozen model, with the units the allocation would remove masked."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ...scoring import distributed
from ...scoring.candidates import Candidates
from ...units.gating import per_column, scaled_inputs
from ...units.model_state import frozen
from ...units.objectives import kl_to_teacher, next_token_log_probs
from ...vocabulary import Level
from ..base import FusionContext, FusionResult
from .attention import BlendAttention, Site

if TYPE_CHECKING:  # the policy imports this module; it is only a type here
    from .policy import AdaptivePolicy

TEACHER_CACHE_BYTES = 512 * 2**20  # dense log-probabilities kept between steps up to this size


class Trainer:
    """Trains the blend attention on a frozen model, with the pruned units masked through hooks."""

    def __init__(self, policy: AdaptivePolicy, attention: BlendAttention, sites: list[Site],
                 candidates: Candidates, base: FusionResult, context: FusionContext, batches: list[torch.Tensor]):
        self.policy, self.attention, self.sites = policy, attention, sites
        self.candidates, self.base, self.context, self.batches = candidates, base, context, batches
        self.model = context.model
        self.units = context.units
        self.levels = context.levels
        # An allocation with fixed counts per site (uniform) removes the same number of units whatever
        # the scores; another (global) moves units between sites when a site's distribution changes.
        self.fixed_counts = context.fixed_counts
        self.masks: dict[tuple[Level, int], torch.Tensor] = {}
        self.teacher: dict[int, torch.Tensor] = {}

    def run(self) -> dict[str, Any]:
        shared = [p for name, p in self.attention.named_parameters() if name != "offsets"]
        optimiser = torch.optim.Adam([{"params": shared, "lr": self.policy.shared_lr},
                                      {"params": [self.attention.offsets], "lr": self.policy.lr}])
        losses: list[float] = []
        checks: list[tuple[int, float, dict]] = []
        best = (math.inf, -1, {k: v.detach().clone() for k, v in self.attention.state_dict().items()})
        progress = tqdm(total=self.policy.steps, desc="adaptive fusion", unit="step",
                        disable=not self.context.progress)
        with frozen(self.model), self._mask_hooks():
            for step in range(self.policy.steps + 1):
                if step % self.policy.eval_every == 0 or step == self.policy.steps:
                    hard = self._hard_loss()
                    checks.append((step, hard, self._mean_weights()))
                    if hard < best[0] or not self.policy.keep_best:
                        best = (hard, step, {k: v.detach().clone() for k, v in self.attention.state_dict().items()})
                if step == self.policy.steps:
                    break
                # Data parallel: with several ranks each takes its own batch of the step (one rank: step's).
                index = (step * distributed.world_size() + distributed.rank()) % len(self.batches)
                batch = self.batches[index]
                fused = self._fused()
                # Sites without a choice to learn are masked too (from their fixed scores), so that
                # the model trains against the whole pruned structure.
                self.masks = {key: _soft_mask(fused.get(key, self._fixed(key)), removed, self.policy.temperature,
                                              straight_through=self.policy.mask == "ste",
                                              fixed_counts=self.fixed_counts)
                              for key, removed in self._removals().items()}
                loss = self._loss(batch, index)
                optimiser.zero_grad()
                loss.backward()
                distributed.average_gradients(self.attention.parameters())  # the same blend on every rank
                optimiser.step()
                losses.append(float(loss.detach()))
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
        progress.close()
        self.attention.load_state_dict(best[2])
        return {"steps": self.policy.steps, "objective": self.policy.objective, "losses": [round(v, 6) for v in losses],
                "hard_checks": [{"step": s, "loss": round(v, 6), "mean_weights": w} for s, v, w in checks],
                "chosen_step": best[1]}

    # ---- scores and masks -------------------------------------------------------------------------
    def _mean_weights(self) -> dict[Level, dict[str, float]]:
        """Each candidate's mean weight over the sites of each level (for the training record)."""
        totals: dict[Level, dict[str, list[float]]] = {}
        with torch.no_grad():
            for site in self.sites:
                for name, w in zip(site.names, self.attention(site)):
                    totals.setdefault(site.level, {}).setdefault(str(name), []).append(float(w))
        return {level: {name: round(sum(v) / len(v), 4) for name, v in by_name.items()}
                for level, by_name in totals.items()}

    def _fused(self) -> dict[tuple[Level, int], torch.Tensor]:
        return {(s.level, s.layer): (self.attention(s)[:, None] * s.scores).sum(0)
                for s in self.sites}

    def _fixed(self, key: tuple[Level, int]) -> torch.Tensor:
        return self.base.scores[key[0]][key[1]].to(torch.float32)

    def _removals(self) -> dict[tuple[Level, int], list[int]]:
        """The units the allocation removes per trained site, given the current blend (no gradient)."""
        with torch.no_grad():
            scores = {level: list(per_layer) for level, per_layer in self.base.scores.items()}
            for (level, layer), fused in self._fused().items():
                scores[level][layer] = fused.to(torch.float64)
            plans = self.context.select(scores)
        removals = {}
        for layer_plan, layer in zip(plans, self.units):
            for level in self.levels:
                removed = layer_plan.removed_units(level, layer.num_units[level])
                if removed:
                    removals[(level, layer.index)] = removed
        return removals

    def _hard_loss(self) -> float:
        """The calibration loss with exactly the units the allocation would remove masked to zero."""
        with torch.no_grad():
            self.masks = {}
            for (level, layer), removed in self._removals().items():
                mask = torch.ones(self.units.layers[layer].num_units[level])
                mask[removed] = 0.0
                self.masks[(level, layer)] = mask
            checked = self.batches[:self.policy.check_batches]
            # Each rank checks its share; the losses are added in batch order, so every rank (and one
            # process alone) gets the same number and picks the same step.
            mine = {i: float(self._loss(batch, i)) for i, batch in distributed.shard(checked)}
            total = sum(distributed.combine(mine, "the fusion's check losses"))
        self.masks = {}
        return total / len(checked)

    def _loss(self, batch: torch.Tensor, index: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = batch.to(device)
        if self.policy.objective == "lm":
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        teacher = self._teacher(ids, index)
        return kl_to_teacher(teacher, self.model(input_ids=ids, use_cache=False).logits)

    def _teacher(self, ids: torch.Tensor, index: int) -> torch.Tensor:
        """The dense model's log-probabilities, kept in half precision while they fit the cache budget."""
        if index in self.teacher:
            return self.teacher[index]
        saved, self.masks = self.masks, {}
        log_probs = next_token_log_probs(self.model, ids)
        self.masks = saved
        size = log_probs.numel() * 2 * len(self.batches)
        if size <= TEACHER_CACHE_BYTES:
            self.teacher[index] = log_probs.to(torch.bfloat16)
        return log_probs

    @contextmanager
    def _mask_hooks(self) -> Iterator[None]:
        """Scale each unit's positions in the input of the projection that reads them (never its weights)."""
        factors = {}
        for layer in self.units:
            for level in self.levels:
                members = layer.input_members(level)
                if not members:
                    continue  # nothing reads this level's outputs as an input: it is not masked
                factors[members[0].module_path] = self._factor(level, layer.index, members[0].owner)
        try:
            with scaled_inputs(self.model, factors):
                yield
        finally:
            self.masks = {}

    def _factor(self, level: Level, layer: int, owner: torch.Tensor):
        def factor() -> torch.Tensor | None:
            mask = self.masks.get((level, layer))
            return None if mask is None else per_column(mask, owner)

        return factor


def _soft_mask(scores: torch.Tensor, removed: list[int], temperature: float, straight_through: bool,
               fixed_counts: bool = True) -> torch.Tensor:
    """A sigmoid around the boundary between the units the allocation removes and those it keeps.

    With `fixed_counts` (uniform allocation) the threshold is the midpoint between the `count`-th
    and the next lowest score, and moves with the blend: only the order within the site can
    change. Otherwise (global allocation) it stays where the allocation drew it, in the site's
    normalised units (the blend of mean-1 candidates has mean 1): lifting or lowering scores
    across it also moves units between sites, as the allocation would.
    With `straight_through` the forward value is the hard mask (0 for `removed`, 1 otherwise) and
    only the gradient is the sigmoid's: the loss is that of the real pruned model, and the gradient
    says which units near the threshold the blend should lift or drop.
    """
    count = len(removed)
    if count >= scores.numel():
        return torch.zeros_like(scores)
    ordered = scores.sort().values
    threshold = (ordered[count - 1] + ordered[count]) / 2
    if not fixed_counts:
        threshold = threshold.detach()
    width = temperature * scores.detach().std().clamp(min=1e-6)
    soft = torch.sigmoid((scores - threshold) / width)
    if not straight_through:
        return soft
    hard = torch.ones_like(soft)
    hard[removed] = 0.0
    return hard + soft - soft.detach()
