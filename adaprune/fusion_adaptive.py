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
pre-hooks on the projections that read those units (o_proj for heads, down_proj for channels)
multiply them by a mask: exactly 0 or 1 in the forward pass (the real pruned model), a sigmoid
around the site's threshold in the backward pass (straight-through). The blend follows the
gradient of the KL divergence to the dense model's next-token distribution. Every few steps the
loss with the hard masks is measured on a few calibration batches, and the best checked step is
kept. Query and offsets start at zero, so training starts from, and never ends worse on that
check than, the equal blend. The hooks are removed afterwards. docs/fusion.md tells the why.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import frozen
from .errors import ConfigurationError
from .fusion import Candidates, FusionPolicy, FusionResult, granularity_of, normalise, register_policy
from .graph import Graph

#: The level whose units each choice of `units` removes (whole blocks mask every unit of the level).
LEVEL_OF_UNIT = {"kv_groups": "kv_group", "query_heads": "head", "channels": "channel"}
FEATURES = ("coarse", "fine", "log_spread", "top_share", "agreement", "depth")
OBJECTIVES = ("kl", "lm")
MASK_KINDS = ("ste", "soft")
TEACHER_CACHE_BYTES = 512 * 2**20  # dense log-probabilities kept between steps up to this size


@dataclass
class Site:
    """One layer x one level, with its usable candidates stacked (`[candidates, units]`)."""

    layer: int
    level: str
    names: list[str]
    scores: torch.Tensor  # float32, each row normalised to mean 1
    features: torch.Tensor  # [candidates, len(FEATURES)]


def candidate_features(scores: torch.Tensor, names: Sequence[str], depth: float) -> torch.Tensor:
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
        granularity = granularity_of(name)
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


@register_policy
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

    # ---- the policy ----------------------------------------------------------------------------
    def fuse(self, candidates: Candidates, context: Any = None) -> FusionResult:
        # The base class settles the sites no candidate ranks (fallback to coarse, with a warning)
        # and the sites with a single usable candidate; only sites with a choice are learned.
        base = _EqualBlend().fuse(candidates, context)
        sites = self._sites(candidates, base)
        generator = torch.Generator().manual_seed(self.seed)
        attention = BlendAttention(sites, self.dim, self.site_bias, generator)
        info: dict[str, Any] = {"steps": 0}
        batches = _training_batches(context, self.batch_size)
        if sites and self.steps and batches is not None:
            info = _Trainer(self, attention, sites, candidates, base, context, batches).run()
        elif sites and self.steps:
            base.warnings.append("adaptive fusion had no calibration batches to train on (pass calibration data "
                                 "to plan()); it used the equal blend")
        with torch.no_grad():
            for site in sites:
                weights = attention(site)
                fused = (weights[:, None] * site.scores).sum(0).to(torch.float64)
                base.scores[site.level][site.layer] = fused
                entry = next(w for w in base.weights if w["layer"] == site.layer and w["level"] == site.level)
                entry["weights"] = {name: round(float(w), 6) for name, w in zip(site.names, weights)}
        base.info = info
        return base

    def _sites(self, candidates: Candidates, base: FusionResult) -> list[Site]:
        """Every site where at least two candidates rank the units."""
        sites = []
        for entry in base.weights:
            names = [n for n in entry.get("weights", {}) if not entry.get("fallback")]
            if len(names) < 2:
                continue
            layer, level = entry["layer"], entry["level"]
            num_layers = len(next(iter(candidates[names[0]].values())))
            stacked = torch.stack([normalise(candidates[n][level][layer]) for n in names]).to(torch.float32)
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

    def site_weights(self, names, usable):
        return {name: 1.0 for name in usable}


def _training_batches(context: Any, batch_size: int) -> list[torch.Tensor] | None:
    """The calibration rows the Pruner kept, regrouped into batches of `batch_size` rows."""
    batches = getattr(context, "calibration_batches", None)
    if not batches or getattr(context, "model", None) is None:
        return None
    rows = [row for batch in batches for row in batch]
    if len({row.numel() for row in rows}) == 1:
        stacked = torch.stack(rows)
        return list(stacked.split(batch_size))
    return list(batches)  # rows of different lengths stay in their original batches


class _Trainer:
    """Trains the blend attention on a frozen model, with the pruned units masked through hooks."""

    def __init__(self, policy: AdaptivePolicy, attention: BlendAttention, sites: list[Site],
                 candidates: Candidates, base: FusionResult, context: Any, batches: list[torch.Tensor]):
        self.policy, self.attention, self.sites = policy, attention, sites
        self.candidates, self.base, self.context, self.batches = candidates, base, context, batches
        self.model = context.model
        self.graph = Graph(self.model, context.spec)
        units = getattr(context, "units", ())
        self.levels = {LEVEL_OF_UNIT[u] for u in units if u in LEVEL_OF_UNIT}
        # Uniform allocation removes a fixed number of units per site whatever the scores; any other
        # (global) moves units between sites when a site's score distribution changes shape.
        self.fixed_counts = getattr(context, "allocation", "uniform") == "uniform"
        self.masks: dict[tuple[str, int], torch.Tensor] = {}
        self.teacher: dict[int, torch.Tensor] = {}

    def run(self) -> dict[str, Any]:
        shared = [p for name, p in self.attention.named_parameters() if name != "offsets"]
        optimiser = torch.optim.Adam([{"params": shared, "lr": self.policy.shared_lr},
                                      {"params": [self.attention.offsets], "lr": self.policy.lr}])
        losses: list[float] = []
        checks: list[tuple[int, float, dict]] = []
        best = (math.inf, -1, {k: v.detach().clone() for k, v in self.attention.state_dict().items()})
        progress = tqdm(total=self.policy.steps, desc="adaptive fusion", unit="step",
                        disable=not getattr(self.context, "progress", False))
        with frozen(self.model), self._mask_hooks():
            for step in range(self.policy.steps + 1):
                if step % self.policy.eval_every == 0 or step == self.policy.steps:
                    hard = self._hard_loss()
                    checks.append((step, hard, self._mean_weights()))
                    if hard < best[0] or not self.policy.keep_best:
                        best = (hard, step, {k: v.detach().clone() for k, v in self.attention.state_dict().items()})
                if step == self.policy.steps:
                    break
                batch = self.batches[step % len(self.batches)]
                fused = self._fused()
                # Sites without a choice to learn are masked too (from their fixed scores), so that
                # the model trains against the whole pruned structure.
                self.masks = {key: _soft_mask(fused.get(key, self._fixed(key)), removed, self.policy.temperature,
                                              straight_through=self.policy.mask == "ste",
                                              fixed_counts=self.fixed_counts)
                              for key, removed in self._removals().items()}
                loss = self._loss(batch, step % len(self.batches))
                optimiser.zero_grad()
                loss.backward()
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
    def _mean_weights(self) -> dict[str, dict[str, float]]:
        """Each candidate's mean weight over the sites of each level (for the training record)."""
        totals: dict[str, dict[str, list[float]]] = {}
        with torch.no_grad():
            for site in self.sites:
                for name, w in zip(site.names, self.attention(site)):
                    totals.setdefault(site.level, {}).setdefault(name, []).append(float(w))
        return {level: {name: round(sum(v) / len(v), 4) for name, v in by_name.items()}
                for level, by_name in totals.items()}

    def _fused(self) -> dict[tuple[str, int], torch.Tensor]:
        return {(s.level, s.layer): (self.attention(s)[:, None] * s.scores).sum(0)
                for s in self.sites}

    def _fixed(self, key: tuple[str, int]) -> torch.Tensor:
        return self.base.scores[key[0]][key[1]].to(torch.float32)

    def _removals(self) -> dict[tuple[str, int], list[int]]:
        """The units the allocation removes per trained site, given the current blend (no gradient)."""
        with torch.no_grad():
            scores = {level: list(per_layer) for level, per_layer in self.base.scores.items()}
            for (level, layer), fused in self._fused().items():
                scores[level][layer] = fused.to(torch.float64)
            plans = self.context.allocate(scores, self.candidates, self.graph)
        removals = {}
        for layer_plan, layer in zip(plans, self.graph):
            for level in self.levels:
                removed = _removed_units(layer_plan, layer.num_units, level)
                if removed:
                    removals[(level, layer.index)] = removed
        return removals

    def _hard_loss(self) -> float:
        """The calibration loss with exactly the units the allocation would remove masked to zero."""
        with torch.no_grad():
            self.masks = {}
            for (level, layer), removed in self._removals().items():
                mask = torch.ones(self.graph.layers[layer].num_units[level])
                mask[removed] = 0.0
                self.masks[(level, layer)] = mask
            checked = self.batches[:self.policy.check_batches]
            total = sum(float(self._loss(batch, i)) for i, batch in enumerate(checked))
        self.masks = {}
        return total / len(checked)

    def _loss(self, batch: torch.Tensor, index: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        ids = batch.to(device)
        if self.policy.objective == "lm":
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        teacher = self._teacher(ids, index)
        logits = self.model(input_ids=ids, use_cache=False).logits.float()
        student = F.log_softmax(logits, dim=-1)
        teacher = teacher.float()
        return (teacher.exp() * (teacher - student)).sum(-1).mean()

    def _teacher(self, ids: torch.Tensor, index: int) -> torch.Tensor:
        """The dense model's log-probabilities, kept in half precision while they fit the cache budget."""
        if index in self.teacher:
            return self.teacher[index]
        saved, self.masks = self.masks, {}
        with torch.no_grad():
            log_probs = F.log_softmax(self.model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        self.masks = saved
        size = log_probs.numel() * 2 * len(self.batches)
        if size <= TEACHER_CACHE_BYTES:
            self.teacher[index] = log_probs.to(torch.bfloat16)
        return log_probs

    @contextmanager
    def _mask_hooks(self) -> Iterator[None]:
        """Scale each unit's positions in the input of the projection that reads them (never its weights)."""
        handles = []
        for layer in self.graph:
            for level in self.levels:
                member = next((m for m in layer.members.get(level, []) if m.dim == 1), None)
                if member is None:
                    continue  # nothing reads this level's outputs as an input: it is not masked
                module = self.model.get_submodule(member.module_path)
                handles.append(module.register_forward_pre_hook(self._hook(level, layer.index, member.owner)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.masks = {}

    def _hook(self, level: str, layer: int, owner: torch.Tensor):
        owned = owner >= 0
        index = owner.clamp(min=0)

        def scale(_module, args):
            mask = self.masks.get((level, layer))
            if mask is None:
                return None
            per_position = torch.where(owned, mask[index], torch.ones((), dtype=mask.dtype))
            return (args[0] * per_position.to(args[0].dtype),) + tuple(args[1:])

        return scale


def _removed_units(layer_plan: Any, num_units: dict[str, int], level: str) -> list[int]:
    """The units of `level` a layer plan removes (all of them when their block goes whole)."""
    if level == "channel":
        return list(range(num_units[level])) if getattr(layer_plan, "remove_mlp", False) \
            else list(layer_plan.remove_channels)
    if getattr(layer_plan, "remove_attention", False):
        return list(range(num_units[level]))
    return list(layer_plan.remove_kv_groups if level == "kv_group" else layer_plan.remove_heads)


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
