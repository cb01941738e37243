"""A table of bad inputs, over the API and the command line: each is refused with the right error
class and a message that names the problem and the fix, and leaves the model's state dict and
every file on disk exactly as they were.

Add a case by adding a row: `ApiCase(id, action, error, match)` (run on several families, or
on the families its `only` predicate picks) or `CliCase(id, argv, match)`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from adaprune import (
    CalibrationError,
    ConfigurationError,
    EstimatorError,
    LayerPlan,
    Plan,
    PlanError,
    Pruner,
    ScoreCache,
)
from adaprune.tools.cli import main
from adaprune.errors import AdapruneError
from adaprune.plugins import detect_spec
from conftest import random_batches
from families import FAMILIES, Shape, build
from test_cli_eval_report import word_tokenizer

FAMILY_NAMES = ("llama", "opt", "bloom")
SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=24)
BY_NAME = {family.name: family for family in FAMILIES}


# ---- fingerprints of what must not change -----------------------------------------------------------
def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(type(model).__name__.encode())
    digest.update(repr([p.requires_grad for p in model.parameters()]).encode())
    digest.update(repr([p.grad is None for p in model.parameters()]).encode())
    return digest.hexdigest()


def tree_hash(root: Path) -> str:
    """Names, kinds and contents of everything under `root` (hidden temporary siblings included)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<dir>")
    return digest.hexdigest()


# ---- the world the cases act on ---------------------------------------------------------------------
@dataclass
class World:
    family: str
    model: torch.nn.Module
    plan: Plan  # a valid plan for `model`
    root: Path  # files the cases read

    @property
    def vocab(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def pruner(self, **kwargs) -> Pruner:
        return Pruner(self.model, **{"estimators": ["magnitude"], "fusion": "fixed", "progress": False, **kwargs})

    def edited(self, edit: Callable[[dict], Any]) -> dict:
        data = copy.deepcopy(self.plan.to_dict())
        edit(data)
        return data


def _files(root: Path) -> Path:
    """Files shared by the file cases: a saved model, texts, plans, score caches, broken variants."""
    model = build(BY_NAME["llama"], SHAPE)
    model.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    sentence = "the cat sat on a mat . the dog ran home"
    (root / "text.txt").write_text("\n\n".join([sentence] * 40))
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\n \n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "list.json").write_text(json.dumps(["a", 3]))
    (root / "broken.json").write_text("{")
    (root / "folder").mkdir()
    (root / "folder" / "note.txt").write_text("not a plan")
    plan = Pruner(model, ratio=0.2, estimators=["magnitude"], fusion="fixed", progress=False).plan()
    plan.save(root / "plan.json")
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "bad_task.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    save_file({"x": torch.zeros(2)}, str(root / "not_a_cache.safetensors"))
    save_file({"scores/magnitude/coarse/channel/0": torch.tensor([float("nan")])},
              str(root / "nan_cache.safetensors"),
              metadata={"adaprune": json.dumps({"format": "adaprune-scores", "version": 1, "estimators": [],
                                                "model": {}})})
    for name, edit in (("bad_weights", lambda f: f.joinpath("model.safetensors").write_bytes(b"garbage" * 10)),
                       ("bad_config", lambda f: f.joinpath("config.json").write_text("{")),
                       ("no_tokenizer", lambda f: [f.joinpath(n).unlink() for n in ("tokenizer.json",
                                                                                   "tokenizer_config.json")])):
        folder = root / name
        model.save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        edit(folder)
    (root / "previous").mkdir()
    (root / "previous" / "keep.txt").write_text("an earlier result")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return _files(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def world(request, files) -> World:
    model = build(BY_NAME[request.param], SHAPE)
    plan = Pruner(model, ratio=0.2, estimators=["magnitude"], fusion="fixed", progress=False).plan()
    return World(request.param, model, plan, files)


# ---- the API table ----------------------------------------------------------------------------------
@dataclass
class ApiCase:
    id: str
    action: Callable[[World], Any]
    error: type[Exception]
    match: str  # regex over the message: the problem and the fix
    only: Callable[[World], bool] = lambda world: True


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit of a plan dict: the field at `path` ("layers.0.remove_channels") set to `value`."""
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


def _delete(path: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    return edit


def _from_dict(*edits: Callable[[dict], None]) -> Callable[[World], Any]:
    def action(world: World) -> Any:
        data = copy.deepcopy(world.plan.to_dict())
        for edit in edits:
            edit(data)
        return world.pruner().apply(Plan.from_dict(data))
    return action


def _with_layer(index: int, mode: str = "slice", **fields) -> Callable[[World], Any]:
    """Apply (`mode`) a plan whose layer `index` (negative: from the end) is replaced by `fields`."""
    def action(world: World) -> Any:
        plan = Plan.from_dict(world.plan.to_dict())
        position = index % len(plan.layers)
        plan.layers[position] = LayerPlan(position, **fields)
        return world.pruner().apply(plan, mode=mode)
    return action


def _compensation(world: World, mean: list | None = None, twice: bool = False) -> dict:
    data = world.plan.to_dict()
    layer = data["layers"][0]
    layer["remove_channels"] = [0, 1]
    entry = {"projection": "model.layers.0.mlp.down_proj", "positions": [0, 1], "mean": mean or [0.5, 0.25]}
    data["compensation"] = [entry, dict(entry)] if twice else [entry]
    return data


def _other_model(world: World) -> Plan:
    other = build(BY_NAME[world.family], Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=4, width=32))
    return Pruner(other, ratio=0.2, estimators=["magnitude"], fusion="fixed", progress=False).plan()


def _cache_of_other_model(world: World) -> ScoreCache:
    other = build(BY_NAME[world.family], Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=24))
    return Pruner(other, estimators=["magnitude"], progress=False).score()


def _meta_copy(world: World) -> torch.nn.Module:
    with torch.device("meta"):
        return type(world.model)(world.model.config)


def _has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _lora(world: World) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {"llama": ["q_proj"], "opt": ["q_proj"], "bloom": ["query_key_value"]}[world.family]
    return get_peft_model(copy.deepcopy(world.model), LoraConfig(r=2, target_modules=names))


def _grouped(world: World) -> bool:
    return detect_spec(world.model).name == "llama"


def _no_blocks(world: World) -> bool:
    return not detect_spec(world.model).removable_blocks()


def _has_no_bias(world: World) -> bool:
    return world.family == "llama"


def _batch(world: World, *shape: int) -> list[torch.Tensor]:
    return [torch.randint(0, world.vocab, shape, generator=torch.Generator().manual_seed(0))]


NAN = float("nan")
API_CASES: list[ApiCase] = [
    # -- Pruner arguments
    ApiCase("ratio-negative", lambda w: w.pruner(ratio=-0.1), ConfigurationError, r"ratio must be in \[0, 1\).*removes a fifth"),
    ApiCase("ratio-one", lambda w: w.pruner(ratio=1.0), ConfigurationError, r"ratio must be in \[0, 1\)"),
    ApiCase("ratio-nan", lambda w: w.pruner(ratio=NAN), ConfigurationError, r"ratio must be in \[0, 1\)"),
    ApiCase("ratio-inf", lambda w: w.pruner(ratio=math.inf), ConfigurationError, r"ratio must be in \[0, 1\)"),
    ApiCase("ratio-string", lambda w: w.pruner(ratio="0.2"), ConfigurationError, r"ratio must be in \[0, 1\).*got '0.2'"),
    ApiCase("ratio-none", lambda w: w.pruner(ratio=None), ConfigurationError, r"ratio must be in \[0, 1\)"),
    ApiCase("mode-unknown", lambda w: w.pruner(mode="cut"), ConfigurationError, r"mode must be one of.*slice.*mask"),
    ApiCase("allocation-unknown", lambda w: w.pruner(allocation="greedy"), ConfigurationError, r"Unknown allocation 'greedy'. Available: global, uniform"),
    ApiCase("fusion-unknown", lambda w: w.pruner(fusion="magic"), ConfigurationError, r"Unknown fusion policy 'magic'. Available: .*adaptive"),
    ApiCase("fusion-options-bad", lambda w: w.pruner(fusion="fixed", fusion_options={"coarse": 2}), ConfigurationError, r"0 <= coarse <= 1"),
    ApiCase("fusion-options-unknown", lambda w: w.pruner(fusion="fixed", fusion_options={"speed": 1}), ConfigurationError, r"refused its options"),
    ApiCase("units-unknown", lambda w: w.pruner(units=["neurons"]), ConfigurationError, r"Unknown unit 'neurons'. Choose among"),
    ApiCase("units-empty", lambda w: w.pruner(units=[]), ConfigurationError, r"units is empty; choose at least one"),
    ApiCase("units-both-head-kinds", lambda w: w.pruner(units=["kv_groups", "query_heads"]), ConfigurationError, r"not both"),
    ApiCase("units-blocks-uniform", lambda w: w.pruner(units=["blocks"], allocation="uniform"), ConfigurationError, r"only removed by an allocation that removes blocks.*choose allocation='global'"),
    ApiCase("units-blocks-unsupported", lambda w: w.pruner(units=["blocks"], allocation="global"), ConfigurationError, r"cannot run without", only=_no_blocks),
    ApiCase("estimators-empty", lambda w: w.pruner(estimators=[]), ConfigurationError, r"estimators is empty; name at least one"),
    ApiCase("estimator-unknown", lambda w: w.pruner(estimators=["tailor"]), EstimatorError, r"Unknown estimator 'tailor'. Available: .*taylor"),
    ApiCase("estimator-bad-option", lambda w: w.pruner(estimators=[{"name": "taylor", "order": 7}]), EstimatorError, r"order must be 1 or 2"),
    ApiCase("estimator-unknown-option", lambda w: w.pruner(estimators=[{"name": "magnitude", "nrom": "l1"}]), EstimatorError, r"refused its options"),
    ApiCase("estimator-no-name", lambda w: w.pruner(estimators=[{"order": 2}]), EstimatorError, r"give a name, a dict with 'name'"),
    ApiCase("estimator-number", lambda w: w.pruner(estimators=[3]), EstimatorError, r"give a name"),
    ApiCase("multiple-zero", lambda w: w.pruner(multiple=0), ConfigurationError, r"multiple must be a positive integer"),
    ApiCase("multiple-float", lambda w: w.pruner(multiple=2.5), ConfigurationError, r"multiple must be a positive integer"),
    ApiCase("layers-outside", lambda w: w.pruner(layers=[7]), ConfigurationError, r"names layer 7, but the model has 3 layers"),
    ApiCase("layers-garbage", lambda w: w.pruner(layers="abc"), ConfigurationError, r"neither a layer index nor a 'start:stop' range.*e.g."),
    # -- planning
    ApiCase("calibration-empty", lambda w: w.pruner(estimators=["taylor"]).plan([]), CalibrationError, r"calibration set is empty.*token_batches"),
    ApiCase("calibration-missing", lambda w: w.pruner(estimators=["taylor"]).plan(), ConfigurationError, r"taylor.*need calibration data: pass"),
    ApiCase("calibration-text-no-tokenizer", lambda w: w.pruner(estimators=["taylor"]).plan(["some text"]), ConfigurationError, r"text; pass tokenizer="),
    ApiCase("calibration-one-token", lambda w: w.pruner(estimators=["taylor"]).plan(_batch(w, 2, 1)), CalibrationError, r"at least 2 tokens"),
    ApiCase("calibration-3d", lambda w: w.pruner(estimators=["taylor"]).plan(_batch(w, 2, 3, 4)), CalibrationError, r"expected token ids of shape \[batch, seq_len\]"),
    ApiCase("calibration-empty-batch", lambda w: w.pruner(estimators=["taylor"]).plan([torch.zeros(0, 5, dtype=torch.long)]), CalibrationError, r"at least one token"),
    ApiCase("ratio-beyond-eligible", lambda w: w.pruner(ratio=0.6, layers=[0]).plan(), ConfigurationError, r"eligible"),
    ApiCase("scores-of-other-model", lambda w: w.pruner().plan(scores=_cache_of_other_model(w)), ConfigurationError, r"made for another model.*score this model"),
    ApiCase("scores-other-estimator", lambda w: w.pruner(estimators=["taylor"]).plan(scores=w.pruner().score()), ConfigurationError, r"not of estimator 'taylor'; score again"),
    ApiCase("compensation-without-bias", lambda w: w.pruner(estimators=[{"name": "fluctuation", "compensate": True}]).plan(random_batches(w.vocab)), ConfigurationError, r"have no bias.*plan without compensate=True", only=_has_no_bias),
    ApiCase("token-ids-beyond-vocab", lambda w: w.pruner(estimators=["taylor"]).plan([torch.full((1, 6), w.vocab)]), CalibrationError, r"token ids from \d+ to \d+, but the model's vocabulary has ids 0 to \d+; tokenize with this model's own tokenizer"),
    ApiCase("token-ids-negative", lambda w: w.pruner(estimators=["taylor"]).plan([torch.full((1, 6), -1)]), CalibrationError, r"from -1 to -1.*tokenize with this model's own tokenizer"),
    ApiCase("token-ids-float", lambda w: w.pruner(estimators=["taylor"]).plan([torch.rand(1, 6)]), CalibrationError, r"holds torch.float32 values; token ids must be integers"),
    ApiCase("sequence-too-long", lambda w: w.pruner(estimators=["taylor"]).plan([torch.ones(1, 65, dtype=torch.long)]), CalibrationError, r"65 tokens, more than the model's max_position_embeddings \(64\); cut the sequences", only=lambda w: w.family != "bloom"),
    ApiCase("mask-shape", lambda w: w.pruner(estimators=["taylor"]).plan([{"input_ids": torch.ones(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 5)}]), CalibrationError, r"attention_mask has shape \(2, 5\).*give a mask of the same shape"),
    ApiCase("mask-holes", lambda w: w.pruner(estimators=["taylor"]).plan([{"input_ids": torch.ones(1, 6, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1]])}]), CalibrationError, r"padding between its tokens.*Give each sequence as its own row"),
    ApiCase("mask-only-padding", lambda w: w.pruner(estimators=["taylor"]).plan([{"input_ids": torch.ones(1, 6, dtype=torch.long), "attention_mask": torch.zeros(1, 6, dtype=torch.long)}]), CalibrationError, r"empty \(or only padding\)"),
    ApiCase("mapping-without-ids", lambda w: w.pruner(estimators=["taylor"]).plan([{"ids": torch.ones(1, 6)}]), CalibrationError, r"without 'input_ids' \(keys: ids\)"),
    ApiCase("meta-device-model", lambda w: Pruner(_meta_copy(w)), ConfigurationError, r"on the meta device.*Load the model with its weights"),
    ApiCase("peft-lora-model", lambda w: Pruner(_lora(w)), ConfigurationError, r"holds peft adapters.*merge_and_unload\(\)", only=lambda w: _has_peft()),
    ApiCase("not-a-module", lambda w: Pruner("model"), ConfigurationError, r"must be a torch.nn.Module"),
    # -- applying
    ApiCase("apply-mode-unknown", lambda w: w.pruner().apply(w.plan, mode="cut"), ConfigurationError, r"mode must be one of"),
    ApiCase("restore-without-mask", lambda w: w.pruner().restore(), ConfigurationError, r"Nothing to restore: restore\(\) undoes apply"),
    ApiCase("plan-of-other-model", lambda w: w.pruner().apply(_other_model(w)), PlanError, r"for another.*Make a plan for this model"),
    ApiCase("all-kv-groups-last-layer", _with_layer(-1, remove_kv_groups=[0, 1]), PlanError, r"removes all 2 KV groups; at least one must stay", only=_grouped),
    ApiCase("all-heads-last-layer", _with_layer(-1, remove_kv_groups=[0, 1, 2, 3]), PlanError, r"removes all 4 KV groups", only=lambda w: not _grouped(w)),
    ApiCase("every-channel", _with_layer(-1, remove_channels=list(range(24))), PlanError, r"every MLP channel; at least one must stay. Lower the ratio", only=lambda w: w.family != "bloom"),
    ApiCase("index-twice", _with_layer(1, remove_channels=[3, 3]), PlanError, r"lists an index twice"),
    ApiCase("index-outside", _with_layer(1, remove_channels=[10_000]), PlanError, r"outside \[0, \d+\)"),
    ApiCase("uneven-heads", _with_layer(1, remove_heads=[0]), PlanError, r"same number.*Remove the same number of heads from each group", only=_grouped),
    ApiCase("block-and-units", _with_layer(1, remove_mlp=True, remove_channels=[1]), PlanError, r"also lists units of it.*leave those empty", only=lambda w: not _no_blocks(w)),
    ApiCase("block-unsupported", _with_layer(1, remove_mlp=True), PlanError, r"cannot run without it; plan again without 'blocks'", only=_no_blocks),
    ApiCase("mask-all-kv-groups", _with_layer(-1, mode="mask", remove_kv_groups=[0, 1]), PlanError, r"KV groups; at least one must stay", only=_grouped),
    # -- plan JSON: every field checked before any tensor is touched
    ApiCase("plan-misspelt-key", _from_dict(_set("layers.0.remove_chanels", [1])), PlanError, r"unknown key 'remove_chanels'.*known keys there are .*remove_channels.*correct its spelling"),
    ApiCase("plan-unknown-top-key", _from_dict(_set("extra", 1)), PlanError, r"unknown key 'extra'.*correct its spelling or remove it"),
    ApiCase("plan-unknown-shape-key", _from_dict(_set("model.shapes.0.num_experts", 4)), PlanError, r"unknown key 'num_experts'"),
    ApiCase("plan-unknown-settings-key", _from_dict(_set("settings.ratoi", 0.2)), PlanError, r"unknown key 'ratoi'"),
    ApiCase("plan-unknown-params-key", _from_dict(_set("params.removed_count", 1)), PlanError, r"unknown key 'removed_count'"),
    ApiCase("plan-unknown-score-level", _from_dict(_set("scores.neuron", [])), PlanError, r"unknown key 'neuron'"),
    ApiCase("plan-unknown-fusion-key", _from_dict(_set("fusion.weights", {})), PlanError, r"unknown key 'weights'"),
    ApiCase("plan-missing-layers", _from_dict(_delete("layers")), PlanError, r"required key 'layers' is missing; fix the plan file, or re-create it"),
    ApiCase("plan-missing-shapes", _from_dict(_delete("model.shapes")), PlanError, r"required key 'shapes' is missing"),
    ApiCase("plan-missing-index", _from_dict(_delete("layers.1.index")), PlanError, r"required key 'index' is missing"),
    ApiCase("plan-missing-head-dim", _from_dict(_delete("model.shapes.0.head_dim")), PlanError, r"required key 'head_dim' is missing"),
    ApiCase("plan-format-missing", _from_dict(_delete("format")), PlanError, r"not an adaprune plan.*make one with Pruner.plan\(\)"),
    ApiCase("plan-version-99", _from_dict(_set("version", 99)), PlanError, r"version 99 is not supported.*re-create the plan"),
    ApiCase("plan-version-true", _from_dict(_set("version", True)), PlanError, r"version True is not supported"),
    ApiCase("plan-version-float", _from_dict(_set("version", 2.0)), PlanError, r"version 2.0 is not supported"),
    ApiCase("plan-index-string", _from_dict(_set("layers.0.index", "0")), PlanError, r"layers\[0\].index: expected an integer, got str"),
    ApiCase("plan-index-order", _from_dict(_set("layers.0.index", 2)), PlanError, r"in order"),
    ApiCase("plan-channels-string", _from_dict(_set("layers.0.remove_channels", ["x"])), PlanError, r"expected an integer, got str 'x'"),
    ApiCase("plan-channels-float", _from_dict(_set("layers.0.remove_channels", [1.0])), PlanError, r"expected an integer, got float"),
    ApiCase("plan-channels-bool", _from_dict(_set("layers.0.remove_channels", [True])), PlanError, r"expected an integer, got bool"),
    ApiCase("plan-channels-not-list", _from_dict(_set("layers.0.remove_channels", 3)), PlanError, r"expected a list, got int"),
    ApiCase("plan-channels-huge", _from_dict(_set("layers.0.remove_channels", [10**30])), PlanError, r"outside \[0, \d+\]"),
    ApiCase("plan-channels-negative", _from_dict(_set("layers.0.remove_channels", [-1])), PlanError, r"-1 is outside"),
    ApiCase("plan-channels-duplicate", _from_dict(_set("layers.0.remove_channels", [2, 2])), PlanError, r"lists an index twice"),
    ApiCase("plan-remove-mlp-string", _from_dict(_set("layers.0.remove_mlp", "yes")), PlanError, r"remove_mlp: expected true or false"),
    ApiCase("plan-remove-attention-int", _from_dict(_set("layers.0.remove_attention", 1)), PlanError, r"expected true or false"),
    ApiCase("plan-shape-float", _from_dict(_set("model.shapes.0.num_heads", 4.0)), PlanError, r"num_heads: expected an integer, got float"),
    ApiCase("plan-shape-huge", _from_dict(_set("model.shapes.0.mlp_width", 10**12)), PlanError, r"outside \[0, 1048576\]"),
    ApiCase("plan-shape-uneven-groups", _from_dict(_set("model.shapes.0.num_kv_heads", 3)), PlanError, r"cannot be shared by 3 KV heads"),
    ApiCase("plan-shapes-not-list", _from_dict(_set("model.shapes", {})), PlanError, r"model.shapes: expected a list"),
    ApiCase("plan-layer-count", _from_dict(lambda d: d["layers"].pop()), PlanError, r"has 2 entries for the 3 layers"),
    ApiCase("plan-model-not-object", _from_dict(_set("model", [])), PlanError, r"model: expected an object, got list"),
    ApiCase("plan-architecture-number", _from_dict(_set("model.architecture", 7)), PlanError, r"architecture: expected a string"),
    ApiCase("plan-score-nan", _from_dict(_set("scores.channel.0.0", NAN)), PlanError, r"scores.channel\[0\]\[0\]: nan is not a finite number"),
    ApiCase("plan-score-inf", _from_dict(_set("scores.kv_group.1.0", math.inf)), PlanError, r"inf is not a finite number"),
    ApiCase("plan-score-string", _from_dict(_set("scores.head.0.0", "high")), PlanError, r"expected a number, got str"),
    ApiCase("plan-score-layers", _from_dict(lambda d: d["scores"]["channel"].pop()), PlanError, r"has 2 layers, the plan 3"),
    ApiCase("plan-ratio-nan", _from_dict(_set("settings.ratio", NAN)), PlanError, r"settings.ratio: nan is not a finite number"),
    ApiCase("plan-multiple-zero", _from_dict(_set("settings.multiple", 0)), PlanError, r"settings.multiple: 0 is outside \[1, inf\]"),
    ApiCase("plan-units-number", _from_dict(_set("settings.units", [1])), PlanError, r"settings.units\[0\]: expected a string"),
    ApiCase("plan-estimator-no-name", _from_dict(_set("settings.estimators", [{"order": 1}])), PlanError, r"with a 'name' string"),
    ApiCase("plan-option-nan", _from_dict(_set("settings.fusion_options", {"coarse": NAN})), PlanError, r"not a finite number"),
    ApiCase("plan-params-negative", _from_dict(_set("params.removed", -5)), PlanError, r"params.removed: -5 is outside"),
    ApiCase("plan-params-fraction", _from_dict(_set("params.prunable_fraction_removed", 1.5)), PlanError, r"outside \[0, 1\]"),
    ApiCase("plan-params-float", _from_dict(_set("params.total_before", 1e9)), PlanError, r"expected an integer, got float"),
    ApiCase("plan-fusion-weight-nan", _from_dict(_set("fusion.sites.0.weights", {"magnitude/coarse": NAN})), PlanError, r"weights.magnitude/coarse: nan is not a finite"),
    ApiCase("plan-fusion-site-twice", _from_dict(lambda d: d["fusion"]["sites"].append(dict(d["fusion"]["sites"][0]))), PlanError, r"has a second entry"),
    ApiCase("plan-fusion-site-layer", _from_dict(_set("fusion.sites.0.layer", 9)), PlanError, r"9 is outside \[0, 2\]"),
    ApiCase("plan-fusion-warning-number", _from_dict(_set("fusion.warnings", [3])), PlanError, r"warnings\[0\]: expected a string"),
    ApiCase("plan-compensation-nan", lambda w: w.pruner().apply(Plan.from_dict(_compensation(w, mean=[NAN, 0.0]))), PlanError, r"mean\[0\]: nan is not a finite number"),
    ApiCase("plan-compensation-twice", lambda w: w.pruner().apply(Plan.from_dict(_compensation(w, twice=True))), PlanError, r"a second time \(its bias would be shifted twice\)"),
    ApiCase("plan-compensation-unsorted", lambda w: Plan.from_dict({**_compensation(w), "compensation": [{"projection": "p", "positions": [1, 0], "mean": [0.0, 0.0]}]}), PlanError, r"not in increasing order"),
    ApiCase("plan-compensation-lengths", lambda w: w.pruner().apply(Plan.from_dict(_compensation(w, mean=[0.5]))), PlanError, r"1 means for 2 positions"),
    ApiCase("plan-compensation-key", lambda w: Plan.from_dict({**_compensation(w), "compensation": [{"projection": "p", "positions": [], "mean": [], "scale": 2}]}), PlanError, r"unknown key 'scale'"),
    ApiCase("plan-not-a-dict", lambda w: Plan.from_dict([1, 2]), PlanError, r"not an adaprune plan"),
    # -- files read by the API
    ApiCase("plan-load-folder", lambda w: Plan.load(w.root / "folder"), PlanError, r"is a folder, not a plan file. Give the plan's JSON file"),
    ApiCase("plan-load-binary", lambda w: Plan.load(w.root / "binary.bin"), PlanError, r"not UTF-8 text \(a binary file\?\). Give the JSON file"),
    ApiCase("plan-load-missing", lambda w: Plan.load(w.root / "nothing.json"), PlanError, r"does not exist: give the plan's JSON file"),
    ApiCase("plan-load-broken", lambda w: Plan.load(w.root / "broken.json"), PlanError, r"not valid JSON.*re-create it"),
    ApiCase("plan-load-deep", lambda w: Plan.load(w.root / "deep.json"), PlanError, r"not valid JSON|not an adaprune plan"),
    ApiCase("plan-load-list", lambda w: Plan.load(w.root / "list.json"), PlanError, r"not an adaprune plan"),
    ApiCase("cache-load-binary", lambda w: ScoreCache.load(w.root / "binary.bin"), ConfigurationError, r"Cannot read the score cache.*Save one with"),
    ApiCase("cache-load-folder", lambda w: ScoreCache.load(w.root / "folder"), ConfigurationError, r"Cannot read the score cache"),
    ApiCase("cache-load-no-metadata", lambda w: ScoreCache.load(w.root / "not_a_cache.safetensors"), ConfigurationError, r"not an adaprune score cache.*save one"),
    ApiCase("cache-load-nan", lambda w: ScoreCache.load(w.root / "nan_cache.safetensors"), ConfigurationError, r"NaN or infinite.*score again"),
]


def _api_params():
    return [pytest.param(case, id=case.id) for case in API_CASES]


@pytest.mark.parametrize("case", _api_params())
def test_api_bad_input(world, files, case):
    if not case.only(world):
        pytest.skip(f"does not apply to {world.family}")
    model_before, files_before = state_hash(world.model), tree_hash(files)
    with pytest.raises(case.error) as raised:
        case.action(world)
    message = str(raised.value)
    assert isinstance(raised.value, AdapruneError), type(raised.value)
    assert re.search(case.match, message, re.S), message
    assert state_hash(world.model) == model_before, "the model changed"
    assert tree_hash(files) == files_before, "a file changed"


# ---- the command-line table -------------------------------------------------------------------------
@dataclass
class CliCase:
    id: str
    argv: list[str]  # "{root}" is the folder of the shared files
    match: str


CALIB = ["--calib", "{root}/text.txt", "--seq-len", "8", "--samples", "4", "--batch-size", "2"]
PRUNE = ["prune", "{root}/model", *CALIB]
OUT = ["--out", "{root}/new-out"]
CLI_CASES: list[CliCase] = [
    CliCase("prune-out-is-input", [*PRUNE, "--out", "{root}/model"], r"is \(or is inside\) the input.*another folder"),
    CliCase("prune-out-inside-input", [*PRUNE, "--out", "{root}/model/pruned"], r"is \(or is inside\) the input"),
    CliCase("prune-out-input-overwrite", [*PRUNE, "--out", "{root}/model", "--overwrite"], r"is \(or is inside\) the input"),
    CliCase("prune-out-holds-input", [*PRUNE, "--out", "{root}", "--overwrite"], r"holds the input.*would delete the input"),
    CliCase("prune-out-not-empty", [*PRUNE, "--out", "{root}/previous"], r"is not empty; pass --overwrite to replace it"),
    CliCase("prune-out-is-file", [*PRUNE, "--out", "{root}/text.txt"], r"is a file; give a folder path"),
    CliCase("prune-out-is-file-overwrite", [*PRUNE, "--out", "{root}/text.txt", "--overwrite"], r"is a file; give a folder path"),
    CliCase("prune-out-under-file", [*PRUNE, "--out", "{root}/text.txt/out"], r"text.txt is a file, not a folder"),
    CliCase("prune-out-unwritable", [*PRUNE, "--out", "/proc/adaprune-out"], r"no permission to create files in /proc"),
    CliCase("prune-report-folder", [*PRUNE, *OUT, "--report", "{root}/folder"], r"--report .* is a folder; give a file path inside it"),
    CliCase("prune-report-under-file", [*PRUNE, *OUT, "--report", "{root}/text.txt/r.json"], r"would overwrite the input|is a file, not a folder"),
    CliCase("prune-report-under-other-file", [*PRUNE, *OUT, "--report", "{root}/plan.json/r.json"], r"plan.json is a file, not a folder. Choose a path"),
    CliCase("prune-report-unwritable", [*PRUNE, *OUT, "--report", "/proc/adaprune-report.json"], r"no permission to create files in /proc"),
    CliCase("prune-report-is-input", [*PRUNE, *OUT, "--report", "{root}/model/config.json"], r"would overwrite the input"),
    CliCase("prune-report-is-calib", [*PRUNE, *OUT, "--report", "{root}/text.txt"], r"would overwrite the input"),
    CliCase("prune-report-is-out", [*PRUNE, *OUT, "--report", "{root}/new-out"], r"--report and --out name the same path"),
    CliCase("prune-calib-empty", ["prune", "{root}/model", "--calib", "{root}/empty.txt", *OUT], r"holds no text.*give a file with some text"),
    CliCase("prune-calib-blank", ["prune", "{root}/model", "--calib", "{root}/blank.txt", *OUT], r"holds no text"),
    CliCase("prune-calib-binary", ["prune", "{root}/model", "--calib", "{root}/binary.bin", *OUT], r"not UTF-8 text.*give plain UTF-8 text"),
    CliCase("prune-calib-folder", ["prune", "{root}/model", "--calib", "{root}/folder", *OUT], r"is a folder; give a text file"),
    CliCase("prune-calib-missing", ["prune", "{root}/model", "--calib", "{root}/none.txt", *OUT], r"does not exist: give a text file"),
    CliCase("prune-calib-json-list", ["prune", "{root}/model", "--calib", "{root}/list.json", *OUT], r"expected a JSON list of strings"),
    CliCase("prune-calib-json-broken", ["prune", "{root}/model", "--calib", "{root}/broken.json", *OUT], r"not valid JSON.*give a JSON list of strings"),
    CliCase("prune-samples-zero", [*PRUNE, "--samples", "0", *OUT], r"--samples must be at least 1, got 0"),
    CliCase("prune-batch-size-zero", [*PRUNE, "--batch-size", "0", *OUT], r"--batch-size must be at least 1"),
    CliCase("prune-seq-len-one", [*PRUNE, "--seq-len", "1", *OUT], r"--seq-len must be at least 2"),
    CliCase("prune-seq-len-too-long", [*PRUNE, "--seq-len", "65", *OUT], r"longer than the model's max_position_embeddings \(64\); give --seq-len 64 or less"),
    CliCase("prune-not-enough-text", [*PRUNE, "--samples", "5000", *OUT], r"not enough text.*give more text with --calib, or lower --samples"),
    CliCase("prune-multiple-zero", [*PRUNE, "--multiple", "0", *OUT], r"--multiple must be at least 1"),
    CliCase("prune-ratio-two", [*PRUNE, "--ratio", "2", *OUT], r"--ratio must be in \[0, 1\), got 2.*removes a fifth"),
    CliCase("prune-ratio-one", [*PRUNE, "--ratio", "1", *OUT], r"--ratio must be in \[0, 1\)"),
    CliCase("prune-ratio-negative", [*PRUNE, "--ratio", "-0.5", *OUT], r"--ratio must be in \[0, 1\)"),
    CliCase("prune-ratio-nan", [*PRUNE, "--ratio", "nan", *OUT], r"--ratio must be in \[0, 1\), got nan"),
    CliCase("prune-options-bad-json", [*PRUNE, "--estimator-options", "{bad", *OUT], r"--estimator-options is not valid JSON.*e.g."),
    CliCase("prune-options-list", [*PRUNE, "--estimator-options", "[1]", *OUT], r"must be a JSON object mapping estimator names to objects"),
    CliCase("prune-options-not-object", [*PRUNE, "--estimator-options", '{"taylor": 3}', *OUT], r"must be a JSON object mapping estimator names to objects"),
    CliCase("prune-options-stray", [*PRUNE, "--estimator-options", '{"taylr": {}}', *OUT], r"options for taylr, which --estimators does not name.*fix the name"),
    CliCase("prune-options-refused", [*PRUNE, "--estimator-options", '{"taylor": {"order": 9}}', *OUT], r"order must be 1 or 2"),
    CliCase("prune-estimators-empty", [*PRUNE, "--estimators", ",", *OUT], r"--estimators is empty; name at least one"),
    CliCase("prune-estimator-unknown", [*PRUNE, "--estimators", "tailor", *OUT], r"Unknown estimator 'tailor'. Available"),
    CliCase("prune-fusion-unknown", [*PRUNE, "--fusion", "magic", *OUT], r"Unknown fusion policy 'magic'. Available"),
    CliCase("prune-allocation-unknown", [*PRUNE, "--allocation", "greedy", *OUT], r"Unknown allocation 'greedy'. Available: global, uniform"),
    CliCase("prune-units-unknown", [*PRUNE, "--units", "neurons", *OUT], r"Unknown unit 'neurons'. Choose among"),
    CliCase("prune-units-empty", [*PRUNE, "--units", ",", *OUT], r"units is empty"),
    CliCase("prune-units-blocks-uniform", [*PRUNE, "--units", "blocks", "--allocation", "uniform", *OUT], r"only removed by an allocation that removes blocks.*choose allocation='global'"),
    CliCase("prune-layers-garbage", [*PRUNE, "--layers", "a:b", *OUT], r"(is not|neither) .*'start:stop' range.*e\.g\."),
    CliCase("prune-layers-none-eligible", [*PRUNE, "--layers", "5:9", *OUT], r"selects no layer of the 3; widen the range"),
    CliCase("prune-layers-outside", [*PRUNE, "--layers", "99", *OUT], r"names layer 99, but the model has 3 layers"),
    CliCase("prune-ratio-unreachable", [*PRUNE, "--ratio", "0.95", "--allocation", "uniform", "--fusion", "fixed", *OUT], r"can remove at most .* Lower the ratio"),
    CliCase("prune-fusion-options-json", [*PRUNE, "--fusion-options", "{bad", *OUT], r"--fusion-options is not valid JSON.*e.g."),
    CliCase("prune-fusion-options-list", [*PRUNE, "--fusion-options", "[1]", *OUT], r"--fusion-options must be a JSON object"),
    CliCase("prune-fusion-options-refused", [*PRUNE, "--fusion", "fixed", "--fusion-options", '{"coarse": 5}', *OUT], r"0 <= coarse <= 1"),
    CliCase("prune-reconstruct-options-bad", [*PRUNE, "--reconstruct-options", '{"dampng": 1}', *OUT], r"not understood.*it takes damping"),
    CliCase("prune-reconstruct-options-off", [*PRUNE, "--no-reconstruct", "--reconstruct-options", '{"damping": 1}', *OUT], r"drop one of them"),
    CliCase("prune-multiple-too-large", [*PRUNE, "--multiple", "1000", *OUT], r"larger than the MLP width.*choose multiple <= 24"),
    CliCase("eval-mc-binary", ["eval", "{root}/model", "--text", "{root}/text.txt", "--mc", "{root}/binary.bin"], r"--mc .* is not UTF-8 text"),
    CliCase("prune-model-missing", ["prune", "{root}/nowhere", *CALIB, *OUT], r"does not exist: give a checkpoint folder"),
    CliCase("prune-model-is-text", ["prune", "{root}/text.txt", *CALIB, *OUT], r"is a file, not a checkpoint: give a checkpoint folder"),
    CliCase("prune-model-empty-folder", ["prune", "{root}/folder", *CALIB, *OUT], r"Could not load a causal language model.*give a transformers checkpoint folder"),
    CliCase("prune-model-bad-weights", ["prune", "{root}/bad_weights", *CALIB, *OUT], r"Could not load a causal language model.*SafetensorError"),
    CliCase("prune-model-bad-config", ["prune", "{root}/bad_config", *CALIB, *OUT], r"config.json is not valid JSON.*save it again"),
    CliCase("prune-model-no-tokenizer", ["prune", "{root}/no_tokenizer", *CALIB, *OUT], r"holds no usable tokenizer.*tokenizer.save_pretrained"),
    CliCase("eval-text-binary", ["eval", "{root}/model", "--text", "{root}/binary.bin"], r"not UTF-8 text"),
    CliCase("eval-text-empty", ["eval", "{root}/model", "--text", "{root}/empty.txt"], r"holds no text"),
    CliCase("eval-text-folder", ["eval", "{root}/model", "--text", "{root}/folder"], r"is a folder; give a text file"),
    CliCase("eval-json-folder", ["eval", "{root}/model", "--text", "{root}/text.txt", "--json", "{root}/folder"], r"--json .* is a folder"),
    CliCase("eval-json-unwritable", ["eval", "{root}/model", "--text", "{root}/text.txt", "--json", "/proc/e.json"], r"no permission to create files in /proc"),
    CliCase("eval-json-under-file", ["eval", "{root}/model", "--text", "{root}/text.txt", "--json", "{root}/plan.json/e.json"], r"is a file, not a folder"),
    CliCase("eval-json-is-input", ["eval", "{root}/model", "--text", "{root}/text.txt", "--json", "{root}/text.txt"], r"would overwrite the input"),
    CliCase("eval-batch-size-zero", ["eval", "{root}/model", "--text", "{root}/text.txt", "--batch-size", "0"], r"--batch-size must be a positive number"),
    CliCase("eval-seq-len-too-long", ["eval", "{root}/model", "--text", "{root}/text.txt", "--seq-len", "100"], r"longer than the model's max_position_embeddings"),
    CliCase("eval-mc-bad", ["eval", "{root}/model", "--text", "{root}/text.txt", "--mc", "{root}/bad_task.json"], r"target_scores"),
    CliCase("eval-model-is-text", ["eval", "{root}/text.txt", "--text", "{root}/text.txt"], r"is a file, not a checkpoint"),
    CliCase("report-binary", ["report", "{root}/binary.bin"], r"not UTF-8 text \(a binary file\?\)"),
    CliCase("report-broken", ["report", "{root}/broken.json"], r"not valid JSON"),
    CliCase("report-folder-without-plan", ["report", "{root}/folder"], r"does not exist: give the plan JSON"),
    CliCase("report-deep", ["report", "{root}/deep.json"], r"not valid JSON|not an adaprune plan"),
    CliCase("report-plot-format", ["report", "{root}/plan.json", "--plot", "{root}/plot.bmpx"], r"name it with one of .png"),
    CliCase("report-plot-folder", ["report", "{root}/plan.json", "--plot", "{root}/folder"], r"--plot .* is a folder"),
    CliCase("report-plot-unwritable", ["report", "{root}/plan.json", "--plot", "/proc/p.png"], r"no permission"),
    CliCase("report-plot-is-plan", ["report", "{root}/plan.json", "--plot", "{root}/plan.json"], r"would overwrite the input"),
    CliCase("demo-ratio-two", ["demo", "--ratio", "2", "--out", "{root}/demo-out"], r"--ratio must be in \[0, 1\)"),
    CliCase("demo-out-is-file", ["demo", "--out", "{root}/text.txt"], r"is a file; give a folder path"),
    CliCase("demo-out-not-empty", ["demo", "--out", "{root}/previous"], r"is not empty; pass --overwrite"),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CLI_CASES])
def test_cli_bad_input(files, case, capsys):
    argv = [arg.replace("{root}", str(files)) for arg in case.argv]
    before = tree_hash(files)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("adaprune: error: ")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.search(case.match, lines[0]), lines[0]
    assert tree_hash(files) == before, "a file changed"


def test_the_table_is_large_enough():
    families = len(FAMILY_NAMES)
    assert len(API_CASES) * families + len(CLI_CASES) >= 100


# ---- warnings: said where people look, not only recorded ----------------------------------------------
def test_fusion_warnings_are_python_warnings(world):
    from adaprune.errors import FusionWarning

    with pytest.warns(FusionWarning, match="no calibration batches to train on"):
        plan = world.pruner(fusion="adaptive").plan()
    assert any("no calibration batches" in w for w in plan.fusion["warnings"])


def test_saving_a_masked_model_warns_how_to_slice(world, tmp_path):
    from adaprune.errors import MaskedModelWarning

    model = copy.deepcopy(world.model)
    pruner = Pruner(model, ratio=0.3, estimators=["magnitude"], fusion="fixed", reconstruct=False, progress=False)
    pruner.apply(pruner.plan(), mode="mask")
    with pytest.warns(MaskedModelWarning, match="full size.*mode='slice'"):
        model.save_pretrained(tmp_path / "masked")
    assert (tmp_path / "masked" / "config.json").is_file()  # it still saves
    pruner.restore()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskedModelWarning)
        model.save_pretrained(tmp_path / "restored")


# ---- inputs that look odd but are fine: they simply work ----------------------------------------------
def test_plan_inside_no_grad_with_numpy_and_torch_ratios(world):
    import numpy as np

    batches = random_batches(world.vocab)
    expected = world.pruner(ratio=0.25, estimators=["taylor"]).plan(batches).layers
    for ratio in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        with torch.no_grad():
            plan = world.pruner(ratio=ratio, estimators=["taylor"]).plan(batches)
        assert plan.layers == expected and plan.settings["ratio"] == 0.25
    assert all(p.grad is None for p in world.model.parameters())
