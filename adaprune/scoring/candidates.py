"""Candidate scores: what scoring hands to fusion, keyed by (estimator, granularity) and level.

A candidate is one estimator's scores at one granularity: one tensor of unit scores per layer and
level. Fusion blends the candidates of each site (one layer x one level) into one score per unit;
the block importance below is what only the raw candidates can tell: which layer matters more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import EstimatorError
from ..estimators.base import GRANULARITIES, Scores
from ..units.table import UnitTable
from ..vocabulary import BLOCK_KINDS, BlockKind, Level


@dataclass(frozen=True)
class CandidateKey:
    """Which estimator, at which granularity ("coarse" or "fine"), produced a candidate."""

    estimator: str
    granularity: str

    def __str__(self) -> str:  # as plans and reports name a candidate
        return f"{self.estimator}/{self.granularity}"


#: candidate -> level -> one tensor of unit scores per layer (higher = more important)
Candidates = dict[CandidateKey, dict[Level, list[torch.Tensor]]]
#: block kind -> per layer, the block's importance relative to the same block in the other layers
#: (1 for the average layer), or None where the layer no longer has the block
BlockImportance = dict[BlockKind, list[float | None]]


def mean_normalised(scores: torch.Tensor) -> torch.Tensor | None:
    """Scores divided by their mean magnitude, so that the average unit scores 1 wherever it sits.

    None when they carry no ranking: empty, not finite, constant, or of mean zero.
    """
    scores = scores.detach().to(torch.float64)
    if scores.numel() == 0 or not torch.isfinite(scores).all():
        return None
    if scores.numel() > 1 and bool((scores == scores[0]).all()):
        return None
    mean = scores.abs().mean()
    return scores / mean if mean > 0 else None


def candidates_of(scores: Mapping[str, Scores]) -> Candidates:
    """Every (estimator, granularity) of `scores` as a candidate, in the estimators' order."""
    return {CandidateKey(name, granularity): {Level(level): per_layer for level, per_layer in by_level.items()}
            for name, by_granularity in scores.items() for granularity, by_level in by_granularity.items()}


def validate_scores(label: str, scores: Scores, table: UnitTable) -> Scores:
    """Refuse scores of the wrong shape or with NaN/inf, naming the estimator; return them as float64 on the CPU."""
    if not isinstance(scores, dict) or not scores or not set(scores) <= set(GRANULARITIES):
        raise EstimatorError(f"Estimator {label} returned granularities "
                             f"{sorted(scores) if isinstance(scores, dict) else type(scores).__name__}; expected "
                             f"a non-empty dict with keys among {GRANULARITIES}.")
    clean: Scores = {}
    for granularity, by_level in scores.items():
        clean[granularity] = {}
        for level, per_layer in by_level.items():
            try:
                level = Level(level)
            except ValueError:
                raise EstimatorError(f"Estimator {label} returned scores for level {level!r}; levels are "
                                     f"{', '.join(level.value for level in Level)}.") from None
            if len(per_layer) != len(table):
                raise EstimatorError(f"Estimator {label} returned {len(per_layer)} layers of {level} "
                                     f"scores for a model with {len(table)} layers.")
            tensors = []
            for layer, values in zip(table, per_layer):
                values = torch.as_tensor(values).detach().to(torch.float64).cpu().flatten()
                expected = layer.num_units[level]
                if values.numel() != expected:
                    raise EstimatorError(f"Estimator {label} returned {values.numel()} {level} scores for "
                                         f"layer {layer.index}, which has {expected} units.")
                if not torch.isfinite(values).all():
                    raise EstimatorError(f"Estimator {label} returned NaN or infinite {level} scores for "
                                         f"layer {layer.index}; the model was not changed.")
                tensors.append(values)
            clean[granularity][level] = tensors
    return clean


def block_importance(candidates: Candidates) -> BlockImportance:
    """Each layer's attention and MLP block importance, comparable across layers.

    Fused unit scores are normalised per site and so cannot say which layer matters more; the raw
    candidates can. A block's raw importance is the sum of its units' scores at its coarsest
    scored level; per candidate it is divided by the mean over the layers that have the block (the
    mean block scores 1), then averaged over candidates.
    """
    result: BlockImportance = {}
    for kind in BLOCK_KINDS:
        relative = []
        for by_level in candidates.values():
            level = next((level for level in kind.levels if level in by_level), None)
            if level is None:
                continue
            totals = torch.tensor([float(t.detach().to(torch.float64).abs().sum()) if t.numel() else math.nan
                                   for t in by_level[level]], dtype=torch.float64)
            present = totals[~torch.isnan(totals)]
            if present.numel() and bool(torch.isfinite(present).all()) and float(present.mean()) > 0:
                relative.append(totals / present.mean())
        if relative:
            mean = torch.stack(relative).mean(0)
            result[kind] = [None if math.isnan(float(value)) else float(value) for value in mean]
    return result
