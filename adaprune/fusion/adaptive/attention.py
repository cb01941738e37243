"""The blend attention of the adaptive fusion: per site, softmax weights over the candidates from their features."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...scoring.candidates import CandidateKey
from ...vocabulary import Level

FEATURES = ("coarse", "fine", "log_spread", "top_share", "agreement", "depth")


@dataclass
class Site:
    """One layer x one level, with its usable candidates stacked (`[candidates, units]`)."""

    layer: int
    level: Level
    names: list[CandidateKey]
    scores: torch.Tensor  # float32, each row normalised to mean 1
    features: torch.Tensor  # [candidates, len(FEATURES)]


def candidate_features(scores: torch.Tensor, names: Sequence[CandidateKey], depth: float) -> torch.Tensor:
    """Features of each candidate's score distribution at one site (`scores`: [candidates, units])."""
    ranks = scores.argsort(dim=1).argsort(dim=1).to(torch.float64)
    rows = []
    for k, name in enumerate(names):
        s = scores[k]
        spread = math.log(float(s.std()) + 1e-3) if s.numel() > 1 else math.log(1e-3)
        top = max(1, s.numel() // 10)
        top_share = float(s.topk(top).values.sum() / s.sum().clamp(min=1e-12))
        others = torch.cat([ranks[:k], ranks[k + 1:]])
        agreement = 0.0
        if len(others) and s.numel() > 1:
            mean_rank = others.mean(0)
            agreement = float(torch.corrcoef(torch.stack([ranks[k], mean_rank]))[0, 1].nan_to_num(0.0))
        granularity = name.granularity
        rows.append([float(granularity == "coarse"), float(granularity == "fine"), spread, top_share, agreement,
                     depth])
    return torch.tensor(rows, dtype=torch.float32)


class BlendAttention(nn.Module):
    """Softmax attention over each site's candidates.

    The logit of a candidate is its key (from its features) against the learned query of the
    site's level, plus, with `site_bias`, a learned offset of its own at that site (as a relative
    position bias in attention): the shared part generalises across sites from the features, the
    offset lets one layer's blend move without moving every other layer's.
    """

    def __init__(self, sites: Sequence[Site], dim: int, site_bias: bool, generator: torch.Generator):
        super().__init__()
        self.dim = dim
        self.key1 = nn.Linear(len(FEATURES), dim)
        self.key2 = nn.Linear(dim, dim)
        with torch.no_grad():  # seeded init, without touching the global random state
            for linear in (self.key1, self.key2):
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.uniform_(-bound, bound, generator=generator)
        # A zero query and zero offsets weigh every candidate equally: training starts from the plain average.
        levels = sorted({site.level for site in sites})
        self.query = nn.ParameterDict({level: nn.Parameter(torch.zeros(dim)) for level in levels})
        widest = max((len(site.names) for site in sites), default=1)
        self.offsets = nn.Parameter(torch.zeros(len(sites), widest), requires_grad=site_bias)
        self.index = {(site.level, site.layer): i for i, site in enumerate(sites)}

    def forward(self, site: Site) -> torch.Tensor:
        keys = self.key2(torch.tanh(self.key1(site.features)))
        logits = keys @ self.query[site.level] / math.sqrt(self.dim)
        logits = logits + self.offsets[self.index[(site.level, site.layer)], :len(site.names)]
        return torch.softmax(logits, dim=0)


