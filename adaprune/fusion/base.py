"""Fusion: many candidate scores per unit (granularities x estimators) in, one score per unit out.

A *site* is one layer and one level. Candidates are normalised per site (divided by their mean)
so that they compare on one scale; a policy then blends them per site and reports the weights it
chose. A policy sees the candidates and a `FusionContext`, never the Pruner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..plan import LayerPlan
from ..scoring.candidates import CandidateKey, Candidates, mean_normalised
from ..units.table import UnitTable
from ..vocabulary import Level

#: level -> one tensor of unit scores per layer
UnitScores = dict[Level, list[torch.Tensor]]


@dataclass(frozen=True)
class FusionContext:
    """What a fusion policy may use besides the candidates.

    `model` is the dense model: a policy may run it (with hooks it removes again) but must leave
    it exactly as it was. With offload it is the model with its decoder layers read from disk at
    each forward (`streaming.offloaded`), which the policy need not know. `levels` are the levels whose units the budget may remove; `batches` the
    calibration token batches of this planning call (empty when there are none); `select(scores)`
    runs the allocation, bound to the budget, on fused scores and returns what it would remove;
    `fixed_counts` says whether that allocation removes the same number of units from a site
    whatever its scores (uniform) or moves units between sites (global).
    """

    model: nn.Module
    units: UnitTable
    levels: tuple[Level, ...]
    batches: list[torch.Tensor]
    select: Callable[[UnitScores], list[LayerPlan]]
    fixed_counts: bool
    progress: bool = False


@dataclass
class FusionResult:
    scores: UnitScores  # one fused tensor per layer, per level
    weights: list[dict[str, Any]] = field(default_factory=list)  # per site: layer, level, {candidate: weight}
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what a policy wants reported (training curve, ...)


class FusionPolicy:
    """Blend candidates per site. Subclasses implement `site_weights`, or override `fuse`.

    Options are keyword arguments of the constructor; `options` reports them, defaults resolved,
    as plans record them.
    """

    name: ClassVar[str]
    #: Whether the policy runs the model (``context.model``, ``context.batches``): with offload it is
    #: then given the model with its decoder layers read from disk at each forward (slower).
    uses_model: ClassVar[bool] = False

    @property
    def options(self) -> dict[str, Any]:
        return {}

    def fuse(self, candidates: Candidates, context: FusionContext) -> FusionResult:
        levels = sorted({level for by_level in candidates.values() for level in by_level})
        result = FusionResult(scores={})
        for level in levels:
            present = {key: by_level[level] for key, by_level in candidates.items() if level in by_level}
            num_layers = len(next(iter(present.values())))
            fused_layers = []
            for layer in range(num_layers):
                normalised = {key: mean_normalised(per_layer[layer]) for key, per_layer in present.items()}
                usable = {key: s for key, s in normalised.items() if s is not None}
                weights = self.site_weights(usable) if usable else {}
                weights = {key: w for key, w in weights.items() if key in usable and w != 0}
                if not weights:
                    coarse = [k for k in present if k.granularity == "coarse"] or list(present)
                    fallback = present[coarse[0]][layer].to(torch.float64)
                    if not torch.isfinite(fallback).all():
                        fallback = torch.zeros_like(fallback)
                    result.warnings.append(f"layer {layer} {level}: no candidate ranks the units (all constant); "
                                           f"fell back to {coarse[0]}")
                    fused_layers.append(fallback)
                    result.weights.append({"layer": layer, "level": level, "weights": {}, "fallback": True})
                    continue
                total = sum(weights.values())
                fused = sum(usable[key] * (w / total) for key, w in weights.items())
                fused_layers.append(fused)
                result.weights.append({"layer": layer, "level": level,
                                       "weights": {str(key): w / total for key, w in weights.items()}})
            result.scores[level] = fused_layers
        return result

    def site_weights(self, usable: dict[CandidateKey, torch.Tensor]) -> dict[CandidateKey, float]:
        """The blend weights of one site's usable candidates (normalised to sum 1 afterwards)."""
        raise NotImplementedError
