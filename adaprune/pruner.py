"""The Pruner: the public entry point that runs the pipeline of DESIGN.md.

    pruner = Pruner(model, ratio=0.2, estimators=["taylor"], fusion="fixed", units=["heads", "channels"])
    plan = pruner.plan(calibration)   # the model is untouched
    pruner.apply(plan)                # masks or slices in place
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import allocation as alloc
from .apply import MaskHandle, count_removed, mask, slice_model
from .calibration import CalibrationStats, as_batches, calibrate
from .errors import ConfigurationError
from .compensation import check_biases, compensation_entries, input_means
from .estimators import Estimator, Scores, parse_estimator, run_estimator
from .export import sync_config
from .fusion import create_policy
from .global_allocation import block_scores
from .graph import Graph
from .plan import LayerPlan, Plan
from .scores import ScoreCache, estimator_record, fingerprint
from .specs import detect_spec

MODES = ("slice", "mask")


class Pruner:
    """Structured pruning of one decoder-only model.

    Args:
        model: a transformers causal LM of a supported family (see ``adaprune.specs``).
        ratio: fraction of the prunable parameters (attention and MLP projections) to remove, in [0, 1).
        estimators: names (``"taylor"``), ``{"name": ..., **options}`` dicts, or Estimator instances.
        fusion: fusion policy name (``adaptive``, ``coarse``, ``fine``, ``fixed``, ...); ``fusion_options``
            its arguments. ``adaptive`` trains its per-site blend on the calibration batches (see
            ``adaprune.fusion_adaptive``).
        allocation: how the budget is spread over layers: ``uniform`` (the same fraction from every
            eligible layer) or ``global`` (one ranking of all units by normalised importance per
            parameter; see ``adaprune.global_allocation``).
        units: what may be removed: ``heads`` / ``kv_groups`` (whole KV groups), ``query_heads``
            (heads within groups, the same number in each), ``channels`` (MLP channels), and with
            global allocation ``blocks`` (whole attention and MLP blocks; or ``attention_blocks``,
            ``mlp_blocks`` alone).
        mode: ``slice`` (physically smaller) or ``mask`` (zeroed, reversible with ``restore()``).
        layers: eligible layers: indices, or ``"start:stop"``; default all.
        multiple: kept MLP widths are rounded to a multiple of this.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.2,
        estimators: Sequence[str | dict | Estimator] = ("taylor",),
        fusion: str = "adaptive",
        fusion_options: dict[str, Any] | None = None,
        allocation: str = "uniform",
        units: Sequence[str] = ("heads", "channels"),
        mode: str = "slice",
        layers: Iterable[int] | str | None = None,
        multiple: int = 8,
        progress: bool = True,
    ) -> None:
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ConfigurationError(f"ratio must be in [0, 1), got {ratio!r}: it is the fraction of prunable "
                                     "parameters to remove (0.2 removes a fifth).")
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}.")
        if allocation not in alloc.STRATEGIES:
            raise ConfigurationError(f"Unknown allocation {allocation!r}. Available: "
                                     f"{', '.join(sorted(alloc.STRATEGIES))}.")
        if not isinstance(multiple, int) or multiple < 1:
            raise ConfigurationError(f"multiple must be a positive integer, got {multiple!r}.")
        self.model = model
        self.spec = detect_spec(model)
        self.ratio = float(ratio)
        self.estimators = [parse_estimator(e) for e in estimators]
        if not self.estimators:
            raise ConfigurationError("estimators is empty; name at least one (see adaprune.list_estimators()).")
        self.fusion = create_policy(fusion, **(fusion_options or {}))
        self.fusion_name = fusion
        self.fusion_options = dict(fusion_options or {})
        self.allocation = allocation
        self.units = alloc.normalise_units(units)
        alloc.check_units(allocation, self.units, self.spec)
        self.mode = mode
        self.layers = layers
        self.multiple = multiple
        self.progress = progress
        self.report: dict[str, Any] = {"stages": {}}
        self._mask: MaskHandle | None = None
        # The scores of the last calibration (score() or plan()): save them, or plan again from them.
        self.score_cache: ScoreCache | None = None
        # The token batches of the last calibration, for fusion policies that train on them (adaptive).
        self.calibration_batches: list[torch.Tensor] = []
        # Resolve the layer choice now, so that a bad one fails before any work.
        alloc.eligible_layers(len(self.spec.decoder_layers(model)), layers)

    # ---- deciding ------------------------------------------------------------------------------
    def score(self, calibration: Iterable | None = None, tokenizer: Any = None) -> ScoreCache:
        """Run the calibration pass once and every estimator; returns `{estimator: scores}` as a ScoreCache.

        The pass gathers the union of what the estimators need; plan from the cache as often as
        you like (`plan(scores=cache)`), or `cache.save(path)` and `ScoreCache.load(path)` it later.
        """
        graph = Graph(self.model, self.spec)
        needs = set().union(*(e.needs for e in self.estimators))
        compensating = any(e.compensates_bias for e in self.estimators)
        if compensating:
            check_biases(self.model, graph)  # refuse before any work
        stats = CalibrationStats()
        if needs - {"weights"}:
            if calibration is None:
                raise ConfigurationError(
                    f"Estimators {[e.name for e in self.estimators if set(e.needs) - {'weights'}]} need calibration "
                    "data: pass token-id batches (or texts with a tokenizer) to plan().")
            batches = as_batches(_tokenize(calibration, tokenizer))
            self.calibration_batches = batches
            # One fold per term name: two estimators may share a term (both Taylor orders need w*g).
            terms = list({t.name: t for e in self.estimators for t in e.gradient_terms()}.values())
            with self._stage("calibration"):
                stats = calibrate(self.model, graph, batches, activations="activations" in needs,
                                  gradient_terms=terms, progress=self.progress)
            self.report["calibration"] = {"samples": stats.samples, "tokens": stats.tokens, "passes": stats.passes,
                                          "mean_loss": stats.mean_loss}
            if "calibration_data" in needs:
                stats.batches = batches
        with self._stage("scoring"):
            scores = {e.name: run_estimator(e, self.model, graph, stats) for e in self.estimators}
        means = input_means(graph, stats) if compensating else None
        self.score_cache = ScoreCache(scores, [estimator_record(e) for e in self.estimators],
                                      fingerprint(self.model, graph), means)
        return self.score_cache

    def plan(self, calibration: Iterable | None = None, tokenizer: Any = None,
             scores: ScoreCache | dict[str, Scores] | None = None) -> Plan:
        """Decide what to remove. The model is not changed.

        `calibration` is an iterable of token-id batches ([batch, seq] tensors or lists), or of
        texts together with `tokenizer`. Pass `scores` (the ScoreCache from `score()`, or loaded
        with `ScoreCache.load`) to plan again at another ratio or fusion without a calibration pass;
        a cache made for another model or other estimators is refused.
        """
        graph = Graph(self.model, self.spec)
        if scores is None:
            scores = self.score(calibration, tokenizer)
        else:
            if calibration is not None:  # scores given: the batches still serve a fusion that trains
                self.calibration_batches = as_batches(_tokenize(calibration, tokenizer))
            if isinstance(scores, ScoreCache):
                scores = scores.select(fingerprint(self.model, graph), self.estimators)
        candidates = {f"{name}/{granularity}": by_level
                      for name, by_granularity in scores.items() for granularity, by_level in by_granularity.items()}
        with self._stage("fusion"):
            fused = self.fusion.fuse(candidates, self)
        allocation_scores = self.allocation_scores(fused.scores, candidates)
        with self._stage("allocation"):
            layer_plans = self.allocate(fused.scores, candidates, graph)
        total = sum(p.numel() for p in self.model.parameters())
        prunable = graph.prunable_count(self.model)
        plan = Plan(
            model={"architecture": type(self.model).__name__, "family": self.spec.name,
                   "shapes": [s.to_dict() for s in graph.shapes]},
            layers=layer_plans,
            settings=self.settings(),
            fusion={"policy": self.fusion_name, "options": self.fusion_options, "sites": fused.weights,
                    "warnings": fused.warnings, **({"training": fused.info} if fused.info else {})},
            scores={level: [[round(float(v), 6) for v in t] for t in per_layer]
                    for level, per_layer in allocation_scores.items()},
        )
        if any(e.compensates_bias for e in self.estimators):
            check_biases(self.model, graph)
            plan.compensation = compensation_entries(plan, self.model, graph, getattr(scores, "means", {}))
        removed = count_removed(plan, graph)
        plan.params = {"total_before": total, "total_after": total - removed, "prunable_before": prunable,
                       "removed": removed,
                       # What the allocation achieved, against the ratio asked (rounding moves it a little).
                       "prunable_fraction_removed": round(removed / prunable, 6) if prunable else 0.0}
        return plan

    def allocation_scores(self, fused: dict[str, list[torch.Tensor]], candidates: dict) -> dict[str, list[torch.Tensor]]:
        """The scores the allocation ranks: the fused ones, and each layer's block scores.

        Fusion normalises every site, so only the raw candidates can say which layer matters more:
        `block_scores` does, for an allocation that compares layers (global) or removes whole blocks.
        """
        return {**fused, **block_scores(candidates)}

    def allocate(self, fused: dict[str, list[torch.Tensor]], candidates: dict,
                 graph: Graph | None = None) -> list[LayerPlan]:
        """The units this Pruner's budget and allocation remove, given fused scores (the model is untouched).

        Fusion policies that train against the pruned structure (adaptive) call it with their current blend.
        """
        graph = graph or Graph(self.model, self.spec)
        budget = alloc.Budget(self.ratio, self.units, alloc.eligible_layers(len(graph), self.layers), self.multiple)
        return alloc.allocate(self.allocation, graph, self.allocation_scores(fused, candidates), budget)

    def settings(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "estimators": [{"name": e.name, **e.options} for e in self.estimators],
                "fusion": self.fusion_name, "fusion_options": self.fusion_options, "allocation": self.allocation,
                "units": list(self.units), "layers": self.layers if isinstance(self.layers, (str, type(None)))
                else list(self.layers), "multiple": self.multiple}

    # ---- acting ---------------------------------------------------------------------------------
    def apply(self, plan: Plan, mode: str | None = None) -> None:
        """Apply `plan` in place: mask (reversible) or slice. The whole plan is checked first."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}.")
        graph = Graph(self.model, self.spec)
        with self._stage("apply"):
            if mode == "mask":
                self._mask = mask(plan, self.model, graph)
            else:
                slice_model(plan, self.model, graph)
                sync_config(self.model, self.spec, plan.pruned_shapes())
        self.report["params_after"] = sum(p.numel() for p in self.model.parameters())

    def restore(self) -> None:
        """Undo a `mask` application."""
        if self._mask is None:
            raise ConfigurationError("Nothing to restore: restore() undoes apply(plan, mode='mask').")
        self._mask.restore()
        self._mask = None

    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.report["stages"][name] = round(time.perf_counter() - start, 3)
            self.report["peak_memory_mb"] = peak_memory_mb()


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _tokenize(calibration: Iterable, tokenizer: Any, max_length: int = 128) -> Iterable:
    """Texts become one sample each (truncated to `max_length` tokens); token ids pass through."""
    items = list(calibration)
    if items and isinstance(items[0], str):
        if tokenizer is None:
            raise ConfigurationError("The calibration set is text; pass tokenizer= to plan() as well.")
        return [torch.tensor([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]]) for text in items]
    return items
