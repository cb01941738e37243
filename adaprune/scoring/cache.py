"""Calibrate once, prune many times: the estimator scores of one model, kept and saved.

`Pruner.score(calibration)` returns a `ScoreCache`; `Pruner.plan(scores=cache)` plans from it at
any ratio, fusion policy or allocation without a new calibration pass. `cache.save(path)` writes
one safetensors file: a tensor per estimator, granularity, level and layer, plus JSON metadata
(the estimators with their options, and the model's fingerprint: architecture and layer shapes).
A cache is refused, with the reason, by a model of another fingerprint or a Pruner asking for an
estimator (or options) it does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigurationError
from ..estimators.base import Estimator, Scores
from ..io import atomic_path
from ..specs.base import stock_class
from ..units.table import UnitTable
from ..vocabulary import Level

SCORES_FORMAT = "adaprune-scores"
SCORES_VERSION = 1


def fingerprint(model: nn.Module, table: UnitTable) -> dict[str, Any]:
    """What a cache (and a plan) must match: the model's class, its family and every layer's shape."""
    return {"architecture": stock_class(type(model)).__name__, "family": table.spec.name,
            "shapes": [shape.to_dict() for shape in table.shapes]}


def estimator_record(estimator: Estimator) -> dict[str, Any]:
    """An estimator's name and options, as plans and caches record them (JSON values)."""
    return json.loads(json.dumps({"name": estimator.name, **estimator.options}))


class ScoreCache(Mapping[str, Scores]):
    """Scores per estimator name (`{estimator: {granularity: {level: [tensor per layer]}}}`).

    `means` holds the input means of the "in" projections when an estimator compensates biases.
    """

    def __init__(self, scores: dict[str, Scores], estimators: list[dict[str, Any]], model: dict[str, Any],
                 means: dict[str, torch.Tensor] | None = None) -> None:
        self.scores = scores
        self.estimators = estimators
        self.model = model
        self.means = dict(means or {})

    def __getitem__(self, name: str) -> Scores:
        return self.scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    # ---- checking -----------------------------------------------------------------------------
    def select(self, model: dict[str, Any], estimators: Sequence[Estimator]) -> ScoreCache:
        """The scores of `estimators` for a model of fingerprint `model`; refuse what does not match."""
        if model != self.model:
            raise ConfigurationError(f"The score cache was made for another model ({_describe(self.model, model)}); "
                                     "score this model with pruner.score(calibration).")
        held = {record["name"]: record for record in self.estimators}
        chosen = {}
        for estimator in estimators:
            wanted = estimator_record(estimator)
            if estimator.name not in held:
                raise ConfigurationError(f"The score cache holds scores of {sorted(held)}, not of estimator "
                                         f"{estimator.name!r}; score again with this estimator.")
            if held[estimator.name] != wanted:
                raise ConfigurationError(f"The score cache's {estimator.name!r} scores were made with "
                                         f"{held[estimator.name]}, not {wanted}; score again with these options.")
            chosen[estimator.name] = self.scores[estimator.name]
        return ScoreCache(chosen, [held[name] for name in chosen], self.model, self.means)

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        # Copies: safetensors refuses tensors that share memory (magnitude's coarse is its fine).
        tensors = {f"means/{module}": mean.detach().clone() for module, mean in self.means.items()}
        for name, by_granularity in self.scores.items():
            for granularity, by_level in by_granularity.items():
                for level, per_layer in by_level.items():
                    for index, values in enumerate(per_layer):
                        tensors[f"scores/{name}/{granularity}/{level}/{index}"] = values.detach().clone()
        meta = {"format": SCORES_FORMAT, "version": SCORES_VERSION, "estimators": self.estimators, "model": self.model}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"adaprune": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> ScoreCache:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("adaprune", "null"))
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (OSError, SafetensorError, json.JSONDecodeError) as error:
            raise ConfigurationError(f"Cannot read the score cache {path}: {error}. Save one with "
                                     "pruner.score(calibration).save(path).") from error
        if not isinstance(meta, dict) or meta.get("format") != SCORES_FORMAT or meta.get("version") != SCORES_VERSION:
            raise ConfigurationError(f"{path} is not an adaprune score cache of version {SCORES_VERSION}; save one "
                                     "with pruner.score(calibration).save(path).")
        if not isinstance(meta.get("estimators"), list) or not isinstance(meta.get("model"), dict):
            raise ConfigurationError(f"{path}: the score cache's metadata is damaged (no estimators or model record); "
                                     "score again with pruner.score(calibration).save(path).")
        scores: dict[str, Scores] = {}
        means = {}
        try:
            for key, values in tensors.items():
                if not torch.isfinite(values).all():
                    raise ValueError(f"{key} holds NaN or infinite values")
                kind, _, rest = key.partition("/")
                if kind == "means":
                    means[rest] = values
                    continue
                if kind != "scores":
                    raise ValueError(f"unknown entry {key!r}")
                name, granularity, level, index = rest.split("/")
                per_layer = scores.setdefault(name, {}).setdefault(granularity, {}).setdefault(Level(level), {})
                per_layer[int(index)] = values
            ordered = {name: {granularity: {level: [per_layer[i] for i in range(len(per_layer))]
                                            for level, per_layer in by_level.items()}
                              for granularity, by_level in by_granularity.items()}
                       for name, by_granularity in scores.items()}
        except (ValueError, KeyError) as error:
            raise ConfigurationError(f"{path}: the score cache is damaged ({error}); score again with "
                                     "pruner.score(calibration).save(path).") from error
        return cls(ordered, meta["estimators"], meta["model"], means)


def _describe(cached: dict[str, Any], current: dict[str, Any]) -> str:
    """The first difference between two fingerprints, in words."""
    if cached.get("architecture") != current.get("architecture"):
        return f"a {cached.get('architecture')}, this is a {current.get('architecture')}"
    if len(cached.get("shapes", [])) != len(current.get("shapes", [])):
        return f"{len(cached.get('shapes', []))} layers, this one has {len(current.get('shapes', []))}"
    for index, (a, b) in enumerate(zip(cached["shapes"], current["shapes"])):
        if a != b:
            return f"layer {index} had shape {a}, this model's is {b}"
    return f"fingerprint {cached}, this model's is {current}"
