"""Fusion: many candidate scores per unit (granularities x estimators) in, one score per unit out.

A *site* is one layer and one level (``kv_group``, ``head``, ``channel``). Candidates are
normalised per site (divided by their mean) so that they compare on one scale; a policy then
blends them per site and reports the weights it chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import ConfigurationError

#: candidate name ("taylor/coarse") -> level -> one tensor per layer
Candidates = Mapping[str, Mapping[str, list[torch.Tensor]]]


@dataclass
class FusionResult:
    scores: dict[str, list[torch.Tensor]]  # level -> one fused tensor per layer
    weights: list[dict[str, Any]] = field(default_factory=list)  # per site: layer, level, {candidate: weight}
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what a policy wants reported (training curve, ...)


def normalise(scores: torch.Tensor) -> torch.Tensor | None:
    """Scores divided by their mean; None when they carry no ranking (constant, or not finite)."""
    scores = scores.to(torch.float64)
    if scores.numel() == 0 or not torch.isfinite(scores).all():
        return None
    if scores.numel() > 1 and bool((scores == scores[0]).all()):
        return None
    mean = scores.abs().mean()
    return scores / mean if mean > 0 else None


def granularity_of(candidate: str) -> str:
    return candidate.rsplit("/", 1)[-1]


class FusionPolicy:
    """Blend candidates per site. Subclasses implement `site_weights`, or override `fuse`."""

    name: ClassVar[str]

    def fuse(self, candidates: Candidates, context: Any = None) -> FusionResult:
        levels = sorted({level for by_level in candidates.values() for level in by_level})
        result = FusionResult(scores={})
        for level in levels:
            present = {name: by_level[level] for name, by_level in candidates.items() if level in by_level}
            num_layers = len(next(iter(present.values())))
            fused_layers = []
            for layer in range(num_layers):
                normalised = {name: normalise(per_layer[layer]) for name, per_layer in present.items()}
                usable = {name: s for name, s in normalised.items() if s is not None}
                weights = self.site_weights(list(present), usable) if usable else {}
                weights = {name: w for name, w in weights.items() if name in usable and w != 0}
                if not weights:
                    coarse = [n for n in present if granularity_of(n) == "coarse"] or list(present)
                    fallback = present[coarse[0]][layer].to(torch.float64)
                    if not torch.isfinite(fallback).all():
                        fallback = torch.zeros_like(fallback)
                    result.warnings.append(f"layer {layer} {level}: no candidate ranks the units (all constant); "
                                           f"fell back to {coarse[0]}")
                    fused_layers.append(fallback)
                    result.weights.append({"layer": layer, "level": level, "weights": {}, "fallback": True})
                    continue
                total = sum(weights.values())
                fused = sum(usable[name] * (w / total) for name, w in weights.items())
                fused_layers.append(fused)
                result.weights.append({"layer": layer, "level": level,
                                       "weights": {name: w / total for name, w in weights.items()}})
            result.scores[level] = fused_layers
        return result

    def site_weights(self, names: list[str], usable: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError


class GranularityPolicy(FusionPolicy):
    """Only the candidates of one granularity, averaged (the other granularity if it has none)."""

    def __init__(self, granularity: str):
        self.granularity = granularity

    def site_weights(self, names, usable):
        chosen = [n for n in usable if granularity_of(n) == self.granularity] or list(usable)
        return {name: 1.0 for name in chosen}


class CoarsePolicy(GranularityPolicy):
    name = "coarse"

    def __init__(self):
        super().__init__("coarse")


class FinePolicy(GranularityPolicy):
    name = "fine"

    def __init__(self):
        super().__init__("fine")


class FixedPolicy(FusionPolicy):
    """A given blend: `coarse` weight on the coarse candidates, the rest on the fine ones."""

    name = "fixed"

    def __init__(self, coarse: float = 0.5):
        if not 0.0 <= coarse <= 1.0:
            raise ConfigurationError(f"fixed fusion needs 0 <= coarse <= 1, got {coarse}")
        self.coarse = coarse

    def site_weights(self, names, usable):
        by_granularity = {g: [n for n in usable if granularity_of(n) == g] for g in ("coarse", "fine")}
        weights = {}
        for granularity, share in (("coarse", self.coarse), ("fine", 1.0 - self.coarse)):
            for name in by_granularity[granularity]:
                weights[name] = share / len(by_granularity[granularity])
        return weights


POLICIES: dict[str, type[FusionPolicy]] = {p.name: p for p in (CoarsePolicy, FinePolicy, FixedPolicy)}


def register_policy(policy: type[FusionPolicy]) -> type[FusionPolicy]:
    """Add a fusion policy (usable as a decorator)."""
    POLICIES[policy.name] = policy
    return policy


def create_policy(name: str, **options: Any) -> FusionPolicy:
    if name not in POLICIES:
        raise ConfigurationError(f"Unknown fusion policy {name!r}. Available: {', '.join(sorted(POLICIES))}.")
    try:
        return POLICIES[name](**options)
    except TypeError as error:
        raise ConfigurationError(f"Fusion policy {name!r} refused its options {options}: {error}") from error


# The adaptive policy lives in its own module and registers itself on import.
from . import fusion_adaptive  # noqa: E402,F401
