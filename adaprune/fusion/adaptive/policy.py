"""Adaptive fusion: per site, an attention over the candidate scores, trained end to end.

At every site (one layer x one level) each candidate score vector (a granularity of an
estimator, normalised to mean 1) is described by features of its own distribution: how spread
and how concentrated it is, how well it agrees with the other candidates' ranking, its
granularity and the depth of the layer. A small key network turns the features into keys; a
learned query per level scores them, a learned offset per site and candidate is added, and a
softmax over the candidates gives the site's blend weights. The fused score is the weighted sum
of the candidates.

Training runs on the calibration batches, with the model's weights frozen and never written.
At each step the allocation decides, from the current fused scores, which units go; forward
pre-hooks on the projections that read those units (the output projection of the heads, the down projection of the channels)
multiply them by a mask: exactly 0 or 1 in the forward pass (the real pruned model), a sigmoid
around the site's threshold in the backward pass (straight-through). The blend follows the
gradient of the KL divergence to the dense model's next-token distribution. Every few steps the
loss with the hard masks is measured on a few calibration batches, and the best checked step is
kept. Query and offsets start at zero, so training starts from, and never ends worse on that
check than, the equal blend. The hooks are removed afterwards. docs/fusion.md tells the why.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigurationError
from ...hookspecs import hookimpl
from ...scoring.candidates import CandidateKey, Candidates, mean_normalised
from ..base import FusionContext, FusionPolicy, FusionResult
from .attention import BlendAttention, Site, candidate_features
from .trainer import Trainer

OBJECTIVES = ("kl", "lm")
MASK_KINDS = ("ste", "soft")


class AdaptivePolicy(FusionPolicy):
    """Blend weights per site from an attention over the candidates, trained on the calibration loss.

    Options: `steps` (gradient steps; 0 keeps the equal blend), `lr` (Adam, for the per-site
    offsets), `temperature` (width of the sigmoid, in standard deviations of the site's fused scores), `batch_size` (calibration
    rows per step), `objective` (``"kl"`` to the dense model, or ``"lm"``: the next-token loss),
    `mask` (``"ste"``: the forward pass removes exactly what the allocation would, the gradient
    flows through the sigmoid; ``"soft"``: the sigmoid in both directions), `eval_every` (steps
    between hard-mask checks of the calibration loss), `check_batches` (how many training batches
    those checks run on), `keep_best` (keep the checked step with the lowest loss, else the last),
    `site_bias` (learn an offset per site and candidate besides the shared query), `shared_lr` (the
    learning rate of the query and keys, lower than `lr`: a step of theirs moves every site of a
    level at once), `dim` (key size), `seed`.
    """

    name = "adaptive"
    uses_model = True

    def __init__(self, steps: int = 24, lr: float = 0.05, temperature: float = 0.5, batch_size: int = 2,
                 objective: str = "kl", mask: str = "ste", eval_every: int = 4, check_batches: int = 4,
                 keep_best: bool = True, site_bias: bool = True, shared_lr: float = 0.01, dim: int = 8,
                 seed: int = 0):
        if objective not in OBJECTIVES:
            raise ConfigurationError(f"adaptive fusion objective must be one of {OBJECTIVES}, got {objective!r}")
        if mask not in MASK_KINDS:
            raise ConfigurationError(f"adaptive fusion mask must be one of {MASK_KINDS}, got {mask!r}")
        if steps < 0 or lr <= 0 or shared_lr < 0 or temperature <= 0 \
                or min(batch_size, eval_every, check_batches, dim) < 1:
            raise ConfigurationError("adaptive fusion needs steps >= 0, lr > 0, shared_lr >= 0, temperature > 0, "
                                     "and batch_size, eval_every, check_batches, dim >= 1.")
        self.steps, self.lr, self.temperature = steps, lr, temperature
        self.batch_size, self.objective, self.eval_every = batch_size, objective, eval_every
        self.check_batches, self.mask, self.keep_best = check_batches, mask, keep_best
        self.site_bias, self.shared_lr = site_bias, shared_lr
        self.dim, self.seed = dim, seed

    @property
    def options(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "temperature": self.temperature, "batch_size": self.batch_size,
                "objective": self.objective, "mask": self.mask, "eval_every": self.eval_every,
                "check_batches": self.check_batches, "keep_best": self.keep_best, "site_bias": self.site_bias,
                "shared_lr": self.shared_lr, "dim": self.dim, "seed": self.seed}

    # ---- the policy ----------------------------------------------------------------------------
    def fuse(self, candidates: Candidates, context: FusionContext) -> FusionResult:
        # The base class settles the sites no candidate ranks (fallback to coarse, with a warning)
        # and the sites with a single usable candidate; only sites with a choice are learned.
        base = _EqualBlend().fuse(candidates, context)
        sites = self._sites(candidates, base)
        generator = torch.Generator().manual_seed(self.seed)
        attention = BlendAttention(sites, self.dim, self.site_bias, generator)
        info: dict[str, Any] = {"steps": 0}
        batches = _training_batches(context.batches, self.batch_size)
        if sites and self.steps and batches:
            info = Trainer(self, attention, sites, candidates, base, context, batches).run()
        elif sites and self.steps:
            base.warnings.append("adaptive fusion had no calibration batches to train on (pass calibration data "
                                 "to plan()); it used the equal blend")
        with torch.no_grad():
            for site in sites:
                weights = attention(site)
                fused = (weights[:, None] * site.scores).sum(0).to(torch.float64)
                base.scores[site.level][site.layer] = fused
                entry = next(w for w in base.weights if w["layer"] == site.layer and w["level"] == site.level)
                entry["weights"] = {str(name): round(float(w), 6) for name, w in zip(site.names, weights)}
        base.info = info
        return base

    def _sites(self, candidates: Candidates, base: FusionResult) -> list[Site]:
        """Every site where at least two candidates rank the units."""
        sites = []
        keys = {str(key): key for key in candidates}
        for entry in base.weights:
            names = [keys[n] for n in entry.get("weights", {}) if not entry.get("fallback")]
            if len(names) < 2:
                continue
            layer, level = entry["layer"], entry["level"]
            num_layers = len(next(iter(candidates[names[0]].values())))
            stacked = torch.stack([mean_normalised(candidates[n][level][layer]) for n in names]).to(torch.float32)
            depth = layer / max(num_layers - 1, 1)
            sites.append(Site(layer, level, names, stacked, candidate_features(stacked, names, depth)))
        if sites:  # standardise each feature over all sites, so no feature dominates the keys by its scale
            features = torch.cat([s.features for s in sites])
            mean, std = features.mean(0), features.std(0).nan_to_num(0.0).clamp(min=1e-6)
            for site in sites:
                site.features = (site.features - mean) / std
        return sites


class _EqualBlend(FusionPolicy):
    """Every usable candidate with the same weight: the adaptive policy's starting point."""

    name = "equal"

    def site_weights(self, usable: dict[CandidateKey, torch.Tensor]) -> dict[CandidateKey, float]:
        return {key: 1.0 for key in usable}


def _training_batches(batches: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The calibration rows of this planning call, regrouped into batches of `batch_size` rows."""
    if not batches:
        return []
    rows = [row for batch in batches for row in batch]
    if len({row.numel() for row in rows}) == 1:
        stacked = torch.stack(rows)
        return list(stacked.split(batch_size))
    return list(batches)  # rows of different lengths stay in their original batches


@hookimpl
def adaprune_fusion_policies():
    return [AdaptivePolicy]
