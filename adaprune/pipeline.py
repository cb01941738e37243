"""The Pruner: the public entry point that composes the pipeline of DESIGN.md.

    score -> fuse -> allocate -> Plan -> apply (mask | slice) -> stages

    pruner = Pruner(model, ratio=0.2)
    plan = pruner.plan(calibration)   # the model is untouched
    pruner.apply(plan)                # masks or slices in place, then the stages

Every stage gets a narrow, typed input (`Candidates`, `FusionContext`, `AllocationScores` and
`Budget`, `Plan`, `StageContext`) and nothing reaches back into the Pruner. `PruneConfig` holds
every setting with its default: the command line builds its options from it, so the two agree.
"""

from __future__ import annotations

import numbers
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .allocation.base import AllocationScores, check_units
from .allocation.budget import Budget, check_multiple, eligible_layers
from .apply.compensation import check_biases, compensation_entries, input_means
from .apply.mask import MaskHandle, mask
from .apply.slicing import slice_model
from .errors import AdapruneError, ConfigurationError, EstimatorError, FusionWarning
from .estimators.base import Estimator, Scores
from .export.config import sync_config
from .fusion.base import FusionContext
from .io import atomic_directory
from .plan import PLAN_FILE, LayerPlan, Plan
from .plugins import create_allocator, create_policy, describe, detect_spec, parse_estimator
from .scoring.cache import ScoreCache, estimator_record, fingerprint
from .scoring.calibration import CalibrationStats, as_batches, calibrate, check_token_ids
from .scoring.candidates import block_importance, candidates_of, validate_scores
from .stages.base import Stage, StageContext
from .stages.reconstruct import OPTIONS as RECONSTRUCT_OPTIONS
from .stages.reconstruct import ReconstructStage
from .streaming.checkpoint import CheckpointWeights
from .streaming.offloaded import disk_offloaded
from .streaming.scoring import check_streamable, streamed_scores
from .streaming.writer import write_streamed
from .units.table import UnitTable
from .vocabulary import parse_units

MODES = ("slice", "mask")


@dataclass
class PruneConfig:
    """Every setting of a pruning run, with its default (shared by the Python API and the command line)."""

    ratio: float = 0.2
    # The defaults are the best configuration of benchmarks/quality_benchmark.py, chosen on a
    # hold-out of the calibration split: two estimators as candidates (Taylor's two granularities
    # and the activation score), the adaptive blend, global allocation (per-layer shapes: the
    # checkpoint reloads with trust_remote_code), then weight reconstruction.
    estimators: Sequence[str | dict | Estimator] = ("taylor", "activation")
    fusion: str = "adaptive"
    fusion_options: dict[str, Any] = field(default_factory=dict)
    allocation: str = "global"
    units: Sequence[str] = ("kv_groups", "channels")
    mode: str = "slice"
    layers: Iterable[int] | str | int | None = None
    multiple: int = 8
    #: Refit the projections that read removed units after apply (True, False, or the stage's options).
    reconstruct: bool | dict[str, Any] = True


DEFAULTS = PruneConfig()


class Pruner:
    """Structured pruning of one decoder-only model.

    Args:
        model: a transformers causal LM of a supported family (see ``adaprune.specs``).
        ratio: fraction of the prunable parameters (attention and MLP projections) to remove, in [0, 1).
        estimators: names (``"taylor"``), ``{"name": ..., **options}`` dicts, or Estimator instances.
        fusion: fusion policy name (``adaptive``, ``coarse``, ``fine``, ``fixed``, or a plugin's);
            ``fusion_options`` its arguments. ``adaptive`` trains its per-site blend on the
            calibration batches of the `plan()` call (see ``adaprune.fusion.adaptive``).
        allocation: how the budget is spread over layers: ``uniform`` (the same fraction from every
            eligible layer), ``global`` (one ranking of all units by normalised importance per
            parameter; see ``adaprune.allocation.ranked``), or a plugin's; ``allocation_options`` its
            arguments (``global``: ``max_layer_fraction``, the most of any layer's prunable parameters
            that may go).
        units: what may be removed: ``kv_groups`` (whole KV groups), ``query_heads`` (heads within
            groups, the same number in each), ``channels`` (MLP channels), and with an allocation
            that removes blocks ``blocks`` (whole attention and MLP blocks; or ``attention_blocks``,
            ``mlp_blocks`` alone).
        mode: ``slice`` (physically smaller) or ``mask`` (zeroed, reversible with ``restore()``).
        layers: eligible layers: an index, indices, or ``"start:stop"``; default all.
        multiple: kept MLP widths are rounded to a multiple of this.
        reconstruct: after apply, refit the projections that read removed units in closed form on
            the calibration batches (``adaprune.stages.reconstruct``); a dict gives its options
            (``damping``, ``samples``, ``target``, ``bias``, ``add_bias``, ``anchor``, and ``epochs``,
            ``lr`` for the layer-wise training after the refit); False skips it.
        stages: further stages after apply (see ``adaprune.stages``), run after reconstruction.
        offload: a safetensors checkpoint folder holding `model`'s weights, for a model larger than
            memory: `model` may then be on the meta device (``adaprune.streaming.empty_model``), the
            scoring loads one decoder layer at a time from the folder, a fusion that trains runs the
            model with each layer read from disk for its forward, and `save()` reconstructs, slices
            and writes one layer at a time (``adaprune.streaming``). Every built-in estimator but
            ``learned``.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float = DEFAULTS.ratio,
        estimators: Sequence[str | dict | Estimator] = DEFAULTS.estimators,
        fusion: str = DEFAULTS.fusion,
        fusion_options: dict[str, Any] | None = None,
        allocation: str = DEFAULTS.allocation,
        allocation_options: dict[str, Any] | None = None,
        units: Sequence[str] = DEFAULTS.units,
        mode: str = DEFAULTS.mode,
        layers: Iterable[int] | str | int | None = DEFAULTS.layers,
        multiple: int = DEFAULTS.multiple,
        reconstruct: bool | dict[str, Any] = DEFAULTS.reconstruct,
        stages: Sequence[Stage] = (),
        offload: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> None:
        self.ratio = _ratio(ratio)
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}.")
        if not isinstance(multiple, numbers.Integral) or isinstance(multiple, bool) or multiple < 1:
            raise ConfigurationError(f"multiple must be a positive integer, got {multiple!r}.")
        check_model(model, weights_elsewhere=offload is not None)
        self.model = model
        self.spec = detect_spec(model)
        self.estimators = [parse_estimator(e) for e in estimators]
        if not self.estimators:
            raise ConfigurationError("estimators is empty; name at least one (see adaprune.list_estimators()).")
        self.fusion = create_policy(fusion, **(fusion_options or {}))
        self.allocator = create_allocator(allocation, **(allocation_options or {}))
        self.units = parse_units(units)
        self.mode = mode
        self.layers = layers
        self.multiple = int(multiple)
        if not isinstance(reconstruct, (bool, dict)):
            raise ConfigurationError(f"reconstruct must be True, False or a dict of its options, got {reconstruct!r}.")
        try:
            # A dict of options, even an empty one, asks for the stage.
            first = [ReconstructStage(**reconstruct)] if isinstance(reconstruct, dict) else \
                [ReconstructStage()] if reconstruct else []
        except TypeError as error:
            raise ConfigurationError(f"reconstruct options {reconstruct} are not understood ({error}); it takes "
                                     f"{', '.join(RECONSTRUCT_OPTIONS)}.") from None
        self.stages = first + list(stages)
        self.progress = progress
        self.weights = CheckpointWeights(offload) if offload is not None else None
        if self.weights is not None:
            check_streamable(self.estimators, self.stages)
        table = UnitTable(model, self.spec)
        self.eligible = eligible_layers(len(table), layers)
        check_units(self.units, self.allocator, self.spec)
        if self.ratio > 0:  # with nothing to remove, no width needs rounding
            check_multiple(table, self.eligible, self.units, self.multiple)
        if any(e.compensates_bias for e in self.estimators):
            check_biases(model, table)  # refuse before any work
        #: Wall seconds of each stage of the latest calls, and the process's peak memory.
        self.timings: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}
        self._mask: MaskHandle | None = None
        self._planned: tuple[Plan, list[torch.Tensor]] | None = None  # the latest plan and its calibration

    # ---- deciding ------------------------------------------------------------------------------
    def score(self, calibration: Iterable | None = None, tokenizer: Any = None) -> ScoreCache:
        """Run the calibration pass once and every estimator; returns `{estimator: scores}` as a ScoreCache.

        The pass gathers the union of what the estimators need; plan from the cache as often as
        you like (`plan(scores=cache)`), or `cache.save(path)` and `ScoreCache.load(path)` it later.
        """
        return self._score(self._batches(calibration, tokenizer))

    def _score(self, batches: list[torch.Tensor]) -> ScoreCache:
        table = UnitTable(self.model, self.spec)
        needs = set().union(*(e.needs for e in self.estimators))
        stats = CalibrationStats()
        if needs - {"weights"} and not batches:
            raise ConfigurationError(
                f"Estimators {[e.name for e in self.estimators if set(e.needs) - {'weights'}]} need calibration "
                "data: pass token-id batches (or texts with a tokenizer) to plan().")
        if self.weights is not None:  # one layer resident at a time: the passes and the scoring together
            with self._timed("calibration"):
                stats, scores = streamed_scores(self.model, table, self.weights, batches, self.estimators,
                                                self._run_estimator, self.progress)
            if stats.passes:
                self.calibration = {"samples": stats.samples, "tokens": stats.tokens, "passes": stats.passes,
                                    "mean_loss": stats.mean_loss, "streamed": True}
            return ScoreCache(scores, [estimator_record(e) for e in self.estimators], fingerprint(self.model, table),
                              self._means(table, stats))
        if needs - {"weights"}:
            # One fold per term name: two estimators may share a term (both Taylor orders need w*g).
            terms = list({t.name: t for e in self.estimators for t in e.gradient_terms()}.values())
            with self._timed("calibration"), torch.enable_grad():
                stats = calibrate(self.model, table, batches, activations="activations" in needs,
                                  gradient_terms=terms, progress=self.progress)
            self.calibration = {"samples": stats.samples, "tokens": stats.tokens, "passes": stats.passes,
                                "mean_loss": stats.mean_loss}
            if "calibration_data" in needs:
                stats.batches = batches
        with self._timed("scoring"), torch.enable_grad():
            scores = {e.name: self._run_estimator(e, table, stats) for e in self.estimators}
        return ScoreCache(scores, [estimator_record(e) for e in self.estimators], fingerprint(self.model, table),
                          self._means(table, stats))

    def _means(self, table: UnitTable, stats: CalibrationStats) -> dict[str, torch.Tensor] | None:
        """The input means bias compensation needs, when an estimator compensates."""
        return input_means(table, stats) if any(e.compensates_bias for e in self.estimators) else None

    def _run_estimator(self, estimator: Estimator, table: UnitTable, stats: CalibrationStats) -> Scores:
        """The estimator's scores, checked; a plugin's own failure is reported with its name."""
        try:
            scores = estimator.score(self.model, table, stats)
        except AdapruneError:
            raise
        except Exception as error:
            raise EstimatorError(f"Estimator {describe(estimator)} failed while scoring: {type(error).__name__}: "
                                 f"{error}") from error
        return validate_scores(describe(estimator), scores, table)

    def plan(self, calibration: Iterable | None = None, tokenizer: Any = None,
             scores: ScoreCache | dict[str, Scores] | None = None) -> Plan:
        """Decide what to remove. The model is not changed.

        `calibration` is an iterable of token-id batches ([batch, seq] tensors or lists), or of
        texts together with `tokenizer`. Pass `scores` (the ScoreCache from `score()`, or loaded
        with `ScoreCache.load`, or a dict of estimator scores) to plan again at another ratio or
        fusion without a calibration pass; the calibration given to this call (if any) still
        serves a fusion that trains. Scores made for another model or other estimators are refused.
        """
        table = UnitTable(self.model, self.spec)
        batches = self._batches(calibration, tokenizer)
        cache = self._score(batches) if scores is None else self._checked_cache(scores, table)
        candidates = candidates_of(cache.scores)
        blocks = block_importance(candidates)
        budget = Budget(self.ratio, self.units, self.eligible, self.multiple)

        def select(fused) -> list[LayerPlan]:
            return self.allocator.allocate(table, AllocationScores(fused, blocks), budget)

        levels = tuple(unit.level for unit in self.units if unit.level is not None)
        with self._timed("fusion"), torch.enable_grad(), self._runnable(table, self.fusion.uses_model) as model:
            context = FusionContext(model, table, levels, batches, select, self.allocator.fixed_counts,
                                    self.progress)
            fused = self.fusion.fuse(candidates, context)
        for warning in fused.warnings:  # recorded in the plan, and said where people look
            warnings.warn(FusionWarning(f"fusion {self.fusion.name}: {warning}"), stacklevel=2)
        with self._timed("allocation"):
            layer_plans = select(fused.scores)
        plan = Plan(
            model=fingerprint(self.model, table),
            layers=layer_plans,
            settings=self.settings(),
            fusion={"policy": self.fusion.name, "options": self.fusion.options, "sites": fused.weights,
                    "warnings": fused.warnings, **({"training": fused.info} if fused.info else {})},
            scores={level: [[round(float(v), 6) for v in t] for t in per_layer]
                    for level, per_layer in fused.scores.items()},
            block_scores={kind: [None if v is None else round(v, 6) for v in per_layer]
                          for kind, per_layer in blocks.items()},
        )
        if any(e.compensates_bias for e in self.estimators):
            plan.compensation = compensation_entries(plan, self.model, table, cache.means)
        total = sum(p.numel() for p in self.model.parameters())
        prunable = table.prunable_count()
        removed = table.count_removed(plan.layers)
        plan.params = {"total_before": total, "total_after": total - removed, "prunable_before": prunable,
                       "removed": removed,
                       # What the allocation achieved, against the ratio asked (rounding moves it a little).
                       "prunable_fraction_removed": round(removed / prunable, 6) if prunable else 0.0}
        self._planned = (plan, batches)
        return plan

    @contextmanager
    def _runnable(self, table: UnitTable, needed: bool) -> Iterator[nn.Module]:
        """The model, for a stage that runs it whole: with offload (when `needed`), its decoder layers
        read from disk during each forward (`streaming.offloaded`)."""
        if self.weights is None or not needed:
            yield self.model
            return
        with disk_offloaded(self.model, self.weights, [layer.path for layer in table]) as model:
            yield model

    def _batches(self, calibration: Iterable | None, tokenizer: Any) -> list[torch.Tensor]:
        if calibration is None:
            return []
        batches = as_batches(_tokenize(calibration, tokenizer))
        check_token_ids(self.model, batches)  # an IndexError deep in the embedding otherwise
        return batches

    def _checked_cache(self, scores: ScoreCache | dict[str, Scores], table: UnitTable) -> ScoreCache:
        """The scores of this Pruner's estimators for this model: a cache is matched by its fingerprint,
        a dict of raw scores checked unit by unit."""
        model = fingerprint(self.model, table)
        if not isinstance(scores, ScoreCache):
            missing = [e.name for e in self.estimators if e.name not in scores]
            if missing:
                raise ConfigurationError(f"The scores given hold {sorted(scores)}, not estimator(s) {missing}; "
                                         "score with pruner.score(calibration).")
            checked = {e.name: validate_scores(describe(e), scores[e.name], table) for e in self.estimators}
            return ScoreCache(checked, [estimator_record(e) for e in self.estimators], model)
        return scores.select(model, self.estimators)

    def settings(self) -> dict[str, Any]:
        """Every setting of this Pruner, defaults resolved (as plans record them)."""
        return {"ratio": self.ratio, "estimators": [estimator_record(e) for e in self.estimators],
                "fusion": self.fusion.name, "fusion_options": self.fusion.options,
                "allocation": self.allocator.name, "allocation_options": self.allocator.options,
                "units": [str(u) for u in self.units],
                "layers": self.layers if isinstance(self.layers, (str, int, type(None))) else list(self.layers),
                "multiple": self.multiple, "stages": {stage.name: stage.options for stage in self.stages}}

    # ---- acting ---------------------------------------------------------------------------------
    def apply(self, plan: Plan, mode: str | None = None, calibration: Iterable | None = None,
              tokenizer: Any = None) -> None:
        """Apply `plan` in place: mask (reversible) or slice, then the stages. The whole plan is checked first.

        Stages that learn from data (reconstruction) use `calibration`, by default the calibration
        of the `plan()` call that made `plan` with this Pruner.
        """
        if self.weights is not None:
            raise ConfigurationError("With offload the model's weights are not in memory to change in place: write "
                                     "the pruned checkpoint with pruner.save(plan, out) (layer by layer).")
        mode = mode or self.mode
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}.")
        table = UnitTable(self.model, self.spec)
        if not self.stages:
            with self._timed("apply"):
                if mode == "mask":
                    self._mask = mask(plan, self.model, table)
                else:
                    slice_model(plan, self.model, table)
                    sync_config(self.model, self.spec, plan.pruned_shapes())
            return
        batches = self._batches(calibration, tokenizer)
        if not batches and self._planned is not None and self._planned[0] is plan:
            batches = self._planned[1]
        # The stages work on the masked model, which still holds what the plan removes; slicing follows.
        with self._timed("apply"):
            handle = mask(plan, self.model, table)
        try:
            context = StageContext(table, handle, batches, self.progress)
            for stage in self.stages:
                with self._timed(stage.name):
                    plan.stages[stage.name] = stage.run(self.model, plan, context)
            # A stage may add parameters (zero biases a refit then fits): the plan's count stays true.
            plan.params["total_after"] += sum(int(report.get("parameters_added", 0))
                                              for report in plan.stages.values())
        except BaseException:
            handle.restore()  # never leave the model half-repaired
            raise
        if mode == "mask":
            self._mask = handle
            return
        with self._timed("slice"):
            handle.release()
            slice_model(plan, self.model, table, shift_biases=False)  # the mask added the bias shifts
            sync_config(self.model, self.spec, plan.pruned_shapes())

    def save(self, plan: Plan, out: str | os.PathLike[str], tokenizer: Any = None, overwrite: bool = False,
             calibration: Iterable | None = None) -> None:
        """Apply `plan` (slicing, then the stages) and write the pruned checkpoint to `out`, atomically.

        The folder holds the weights, the config (and the generated modeling file for per-layer
        shapes), the tokenizer when given, and the plan (`adaprune_plan.json`). With offload, the
        layers are sliced and written one at a time as safetensors shards, never all in memory.
        `calibration` is what the stages (reconstruction) read, as in `apply`; by default the
        batches of the `plan()` call that made `plan`.
        """
        with atomic_directory(out, overwrite=overwrite) as folder:
            if self.weights is not None:
                table = UnitTable(self.model, self.spec)
                reconstruct = next((s for s in self.stages if isinstance(s, ReconstructStage)), None)
                batches = self._batches(calibration, None)
                if not batches and self._planned is not None and self._planned[0] is plan:
                    batches = self._planned[1]
                with self._timed("slice"):
                    report = write_streamed(self.model, table, plan, self.weights, folder, reconstruct, batches,
                                            self.progress)
                if report is not None:
                    plan.stages[reconstruct.name] = report
            else:
                self.apply(plan, mode="slice", calibration=calibration)
                self.model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            plan.save(folder / PLAN_FILE)

    def restore(self) -> None:
        """Undo a `mask` application."""
        if self._mask is None:
            raise ConfigurationError("Nothing to restore: restore() undoes apply(plan, mode='mask').")
        self._mask.restore()
        self._mask = None

    # ---- reporting ------------------------------------------------------------------------------
    def report(self, plan: Plan) -> dict[str, Any]:
        """The run report of DESIGN.md: sizes, wall time per stage, peak memory, estimators, fusion, kept units."""
        params_after = sum(p.numel() for p in self.model.parameters())
        before = plan.params["total_before"]
        return {
            "params_before": before,
            "params_after": params_after,
            "fraction_removed": 1 - params_after / before,
            "prunable_fraction_removed": plan.params["removed"] / plan.params["prunable_before"],
            "stage_seconds": dict(self.timings),
            "peak_memory_mb": peak_memory_mb(),
            "calibration": self.calibration or None,
            "estimators": plan.settings["estimators"],
            "fusion": plan.fusion,
            "settings": plan.settings,
            "stages": plan.stages,
            "kept": plan.summary()["layers"],
        }

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def check_model(model: nn.Module, weights_elsewhere: bool = False) -> None:
    """Refuse, before any work, models adaprune cannot prune in place: weights not loaded, wrapped Linears.

    `weights_elsewhere` (offload): parameters on the meta device are expected, their values stream in.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"model must be a torch.nn.Module (a transformers causal LM), got "
                                 f"{type(model).__name__}.")
    if type(model).__module__.startswith("peft.") or any(
            hasattr(module, "base_layer") and type(module).__module__.startswith("peft.") for module in model.modules()):
        raise ConfigurationError(
            f"The model holds peft adapters ({type(model).__name__}): pruning would cut the wrapped base layers and "
            "leave the adapters the old shapes. Merge them first (model = model.merge_and_unload()), or prune the base "
            "model before adding adapters.")
    meta = [name for name, param in model.named_parameters() if param.is_meta]
    offloaded = [name for name, module in model.named_modules()
                 if getattr(getattr(module, "_hf_hook", None), "offload", False)]
    if meta and offloaded and not weights_elsewhere:
        raise ConfigurationError(
            f"accelerate offloaded {len(offloaded)} modules of the model to the CPU or disk (e.g. {offloaded[0]}): "
            "their weights live outside the model (a device_map whose devices could not hold it all, such as "
            "device_map='auto' on a GPU too small), and slicing them in place is not possible. Load it where every "
            "module is resident (device_map='cpu', or GPUs that hold it together), or prune from the checkpoint "
            "without loading it: Pruner(adaprune.streaming.empty_model(folder), offload=folder) (docs/scale.md).")
    if meta and not weights_elsewhere:
        raise ConfigurationError(
            f"{len(meta)} parameters of the model are on the meta device (no weights, e.g. {meta[0]}): it was built "
            "without loading them. Load the model with its weights (from_pretrained(...) without init_empty_weights "
            "or device_map='meta'), or, for a model larger than memory, pass offload=<its safetensors folder>.")


def _ratio(ratio: Any) -> float:
    """The ratio as a float in [0, 1): Python, numpy and one-element torch numbers are accepted."""
    if isinstance(ratio, torch.Tensor) and ratio.numel() == 1 and not ratio.dtype.is_complex:
        ratio = ratio.item()
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigurationError(f"ratio must be in [0, 1), got {ratio!r}: it is the fraction of prunable "
                                 "parameters to remove (0.2 removes a fifth).")
    return float(ratio)


def _tokenize(calibration: Iterable, tokenizer: Any, max_length: int = 128) -> Iterable:
    """Texts become one sample each (truncated to `max_length` tokens); token ids pass through."""
    if isinstance(calibration, (Mapping, torch.Tensor, str)):
        calibration = [calibration]  # one batch (a tokenizer's output, a tensor) or one text given on its own
    items = list(calibration)
    if items and isinstance(items[0], str):
        if tokenizer is None:
            raise ConfigurationError("The calibration set is text; pass tokenizer= to plan() as well.")
        return [torch.tensor([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]]) for text in items]
    return items


__all__ = ["DEFAULTS", "MODES", "PruneConfig", "Pruner"]
