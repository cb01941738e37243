"""Fusion policies with weights fixed in advance: one granularity alone, or a given blend."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigurationError
from ..hookspecs import hookimpl
from ..scoring.candidates import CandidateKey
from .base import FusionPolicy


class GranularityPolicy(FusionPolicy):
    """Only the candidates of one granularity, averaged (the other granularity if it has none)."""

    granularity: str

    def site_weights(self, usable: dict[CandidateKey, torch.Tensor]) -> dict[CandidateKey, float]:
        chosen = [k for k in usable if k.granularity == self.granularity] or list(usable)
        return {key: 1.0 for key in chosen}


class CoarsePolicy(GranularityPolicy):
    name = "coarse"
    granularity = "coarse"


class FinePolicy(GranularityPolicy):
    name = "fine"
    granularity = "fine"


class FixedPolicy(FusionPolicy):
    """A given blend: `coarse` weight on the coarse candidates, the rest on the fine ones."""

    name = "fixed"

    def __init__(self, coarse: float = 0.5):
        if not isinstance(coarse, (int, float)) or isinstance(coarse, bool) or not 0.0 <= coarse <= 1.0:
            raise ConfigurationError(f"fixed fusion needs 0 <= coarse <= 1, got {coarse!r}")
        self.coarse = float(coarse)

    @property
    def options(self) -> dict[str, Any]:
        return {"coarse": self.coarse}

    def site_weights(self, usable: dict[CandidateKey, torch.Tensor]) -> dict[CandidateKey, float]:
        by_granularity = {g: [k for k in usable if k.granularity == g] for g in ("coarse", "fine")}
        weights = {}
        for granularity, share in (("coarse", self.coarse), ("fine", 1.0 - self.coarse)):
            for key in by_granularity[granularity]:
                weights[key] = share / len(by_granularity[granularity])
        return weights


@hookimpl
def adaprune_fusion_policies():
    return [CoarsePolicy, FinePolicy, FixedPolicy]
