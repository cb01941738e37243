"""The Plan: a plain, JSON-serialisable record of what to remove, and why.

Everything before the Plan decides; everything after it acts. A plan names units by their
index in the model it was made for, and records that model's layer shapes so that it is
refused, before any tensor is touched, by a model of another shape.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PlanError
from .io import write_text
from .specs.base import AttentionShape, LayerShape, Owner
from .vocabulary import BlockKind, Level

PLAN_FORMAT = "adaprune-plan"
# 2 added whole-block removal (remove_attention, remove_mlp); 3 moved the block importance out of
# `scores` into `block_scores` and records every setting with its defaults resolved.
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # a version-1 plan reads as one that removes no whole block
PLAN_FILE = "adaprune_plan.json"  # the name `adaprune prune` saves the plan under in its output folder


@dataclass
class LayerPlan:
    """What goes from one decoder layer. Indices are those of the unpruned layer.

    `remove_attention` / `remove_mlp` drop the whole block (the layer then adds nothing from it to
    the residual stream); the unit lists of a block that goes whole stay empty.
    """

    index: int
    remove_kv_groups: list[int] = field(default_factory=list)
    remove_heads: list[int] = field(default_factory=list)  # query heads of groups that stay
    remove_channels: list[int] = field(default_factory=list)
    remove_attention: bool = False
    remove_mlp: bool = False

    def removed_blocks(self) -> list[BlockKind]:
        """The blocks that go whole."""
        return [kind for kind, gone in ((BlockKind.ATTENTION, self.remove_attention), (BlockKind.MLP, self.remove_mlp))
                if gone]

    def removed_units(self, level: Level, num_units: int) -> list[int]:
        """The units of `level` this plan names for removal (all `num_units` of them when their block goes whole).

        A query head of a removed KV group is not listed at the head level: the group owns it.
        """
        if self.remove_attention and level is not Level.CHANNEL or self.remove_mlp and level is Level.CHANNEL:
            return list(range(num_units))
        return list({Level.KV_GROUP: self.remove_kv_groups, Level.HEAD: self.remove_heads,
                     Level.CHANNEL: self.remove_channels}[level])

    def removed_query_heads(self, shape: AttentionShape) -> set[int]:
        if self.remove_attention:
            return set(range(shape.num_heads))
        per_group = shape.heads_per_group
        groups = set(self.remove_kv_groups)
        return {h for h in range(shape.num_heads) if h // per_group in groups} | set(self.remove_heads)

    def keeps(self, shape: LayerShape) -> Callable[[Owner], bool]:
        """Whether a block owner of the spec's layouts (a query head, a KV group, a channel) survives this plan."""
        removed = {
            Level.HEAD: self.removed_query_heads(shape.attention),
            Level.KV_GROUP: set(self.removed_units(Level.KV_GROUP, shape.attention.num_kv_heads)),
            Level.CHANNEL: set(self.removed_units(Level.CHANNEL, shape.mlp_width)),
        }
        return lambda owner: owner[1] not in removed[owner[0]]

    def pruned_shape(self, shape: LayerShape) -> LayerShape:
        """The layer's shape after the plan; a removed attention block is (0, 0, 0), a removed MLP 0 wide."""
        attention = shape.attention
        if self.remove_attention or self.remove_mlp:
            kept = LayerPlan(self.index, self.remove_kv_groups, self.remove_heads, self.remove_channels)
            pruned = kept.pruned_shape(shape)
            return LayerShape(attention=AttentionShape(0, 0, 0) if self.remove_attention else pruned.attention,
                              mlp_width=0 if self.remove_mlp else pruned.mlp_width)
        return LayerShape(
            attention=AttentionShape(
                num_heads=attention.num_heads - len(self.removed_query_heads(attention)),
                num_kv_heads=attention.num_kv_heads - len(self.remove_kv_groups),
                head_dim=attention.head_dim,
            ),
            mlp_width=shape.mlp_width - len(self.remove_channels),
        )


@dataclass
class Plan:
    """What to remove from a model, with the scores and fusion weights that decided it.

    ``model`` records the architecture and the per-layer shapes of the model the plan is for;
    ``settings`` the Pruner's arguments; ``fusion`` the blend weights chosen per site;
    ``scores`` (optional) the fused score of every unit, per level; ``block_scores`` (optional)
    each layer's block importance relative to the other layers' (what allocation weighed layers
    by); ``params`` the parameter counts before and after; ``compensation`` (optional) the bias
    shifts of adaprune.apply.compensation; ``stages`` what the stages after apply did.
    """

    model: dict[str, Any]
    layers: list[LayerPlan]
    settings: dict[str, Any] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    block_scores: dict[str, Any] = field(default_factory=dict)
    compensation: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---- shapes -------------------------------------------------------------------------
    @property
    def shapes(self) -> list[LayerShape]:
        return [_shape_from_dict(d) for d in self.model["shapes"]]

    def pruned_shapes(self) -> list[LayerShape]:
        return [layer.pruned_shape(shape) for layer, shape in zip(self.layers, self.shapes)]

    def summary(self) -> dict[str, Any]:
        """Kept heads, KV groups and channels per layer."""
        return {
            "layers": [
                {"layer": i, "heads": s.attention.num_heads, "kv_groups": s.attention.num_kv_heads,
                 "channels": s.mlp_width}
                for i, s in enumerate(self.pruned_shapes())
            ]
        }

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "model": self.model,
            "settings": self.settings,
            "params": self.params,
            "layers": [asdict(layer) for layer in self.layers],
            "fusion": self.fusion,
            "scores": self.scores,
            **({"block_scores": self.block_scores} if self.block_scores else {}),
            **({"compensation": self.compensation} if self.compensation else {}),
            **({"stages": self.stages} if self.stages else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Read a plan from its JSON form, checking every field first (see `check_plan_dict`)."""
        check_plan_dict(data)
        data = copy.deepcopy(data)  # the plan must not change when the caller's dict does
        layers = [LayerPlan(**{key: d[key] for key in LAYER_KEYS if key in d}) for d in data["layers"]]
        scores, block_scores = data.get("scores", {}), data.get("block_scores", {})
        for kind in BlockKind:  # version 2 kept the block importance among the unit scores
            if f"{kind}_block" in scores:
                block_scores[str(kind)] = [values[0] if values else None for values in scores.pop(f"{kind}_block")]
        # An older plan is read into the current format, and saved as such.
        return cls(model=data["model"], layers=layers, settings=data.get("settings", {}),
                   params=data.get("params", {}), fusion=data.get("fusion", {}), scores=scores,
                   block_scores=block_scores, compensation=data.get("compensation", []),
                   stages=data.get("stages", {}))

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically (a failed write leaves the previous file as it was);
        a plan that would not load back is refused first."""
        data = self.to_dict()
        check_plan_dict(data)
        write_text(path, json.dumps(data, indent=1, allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan saved with `save()`; anything else is a PlanError naming the fix."""
        path = Path(path)
        if path.is_dir():
            hint = (f" It holds {path / PLAN_FILE}: give that file." if (path / PLAN_FILE).is_file()
                    else " Give the plan's JSON file (Plan.save(), or adaprune_plan.json in a folder "
                         "`adaprune prune` wrote).")
            raise PlanError(f"{path} is a folder, not a plan file.{hint}")
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError as error:
            raise PlanError(f"{path} does not exist: give the plan's JSON file (written by Plan.save()).") from error
        except UnicodeDecodeError as error:
            raise PlanError(f"{path} is not a plan: it is not UTF-8 text (a binary file?). Give the JSON file "
                            "written by Plan.save().") from error
        except OSError as error:
            raise PlanError(f"Cannot read the plan {path} ({error.strerror or error}); check the path and its "
                            "permissions.") from error
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise PlanError(f"{path} is not valid JSON ({error}); the plan file is corrupt, re-create it with "
                            "Pruner.plan() and Plan.save().") from error
        return cls.from_dict(data)

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, architecture: str, shapes: Sequence[LayerShape]) -> None:
        """Refuse the plan unless it fits a model of this architecture and these layer shapes."""
        if self.model.get("architecture") != architecture:
            raise PlanError(f"The plan was made for a {self.model.get('architecture')}, not a {architecture}; "
                            "make a plan for this model with Pruner.plan().")
        planned = self.shapes
        if len(planned) != len(shapes) or len(self.layers) != len(shapes):
            raise PlanError(f"The plan is for a model with {len(planned)} layers; this one has {len(shapes)}. "
                            "Make a plan for this model with Pruner.plan().")
        for i, (plan_shape, shape) in enumerate(zip(planned, shapes)):
            if plan_shape != shape:
                raise PlanError(
                    f"Layer {i} of the plan's model has shape {plan_shape.to_dict()}, but this model's has "
                    f"{shape.to_dict()}: the plan is for another (or an already pruned) model. Make a plan for "
                    "this model with Pruner.plan().")
        for i, (layer, shape) in enumerate(zip(self.layers, shapes)):
            _validate_layer(i, layer, shape)


def _validate_layer(i: int, layer: LayerPlan, shape: LayerShape) -> None:
    if layer.index != i:
        raise PlanError(f"Plan entry {i} says it is for layer {layer.index}; the plan is corrupt.")
    attention = shape.attention
    for name, values, limit in (("remove_kv_groups", layer.remove_kv_groups, attention.num_kv_heads),
                                ("remove_heads", layer.remove_heads, attention.num_heads),
                                ("remove_channels", layer.remove_channels, shape.mlp_width)):
        if len(set(values)) != len(values):
            raise PlanError(f"Layer {i}: {name} lists an index twice; the plan is corrupt.")
        if any(v < 0 or v >= limit for v in values):
            raise PlanError(f"Layer {i}: {name} has an index outside [0, {limit}); the plan is corrupt "
                            "or for another model.")
    for kind, gone, names in (("attention", layer.remove_attention, ("remove_kv_groups", "remove_heads")),
                              ("mlp", layer.remove_mlp, ("remove_channels",))):
        if gone and any(getattr(layer, name) for name in names):
            raise PlanError(f"Layer {i}: the plan removes the whole {kind} block and also lists units of it in "
                            f"{' / '.join(names)}; leave those empty, the whole block goes.")
    # The floors below hold for blocks that stay (one already gone, 0 heads or 0 channels, has none).
    if not layer.remove_mlp and shape.mlp_width and len(layer.remove_channels) >= shape.mlp_width:
        raise PlanError(f"Layer {i}: the plan removes every MLP channel; at least one must stay. Lower the ratio, "
                        "or remove the whole block with remove_mlp (units 'blocks', allocation 'global').")
    if layer.remove_attention or not attention.num_kv_heads:
        return
    if len(layer.remove_kv_groups) >= attention.num_kv_heads:
        raise PlanError(f"Layer {i}: the plan removes all {attention.num_kv_heads} KV groups; at least one must "
                        "stay. Lower the ratio or exclude the layer with layers=, or remove the whole block with "
                        "remove_attention (units 'blocks', allocation 'global').")
    per_group = attention.heads_per_group
    groups_removed = set(layer.remove_kv_groups)
    if any(h // per_group in groups_removed for h in layer.remove_heads):
        raise PlanError(f"Layer {i}: remove_heads lists a head of a KV group that is removed whole; "
                        "the plan is corrupt.")
    left = [sum(1 for h in range(g * per_group, (g + 1) * per_group) if h not in layer.remove_heads)
            for g in range(attention.num_kv_heads) if g not in groups_removed]
    if len(set(left)) > 1 or min(left) < 1:
        raise PlanError(f"Layer {i}: the KV groups that stay would keep {left} query heads; every group must keep "
                        "the same number, at least one. Remove the same number of heads from each group.")


def _shape_from_dict(d: dict[str, int]) -> LayerShape:
    return LayerShape(AttentionShape(int(d["num_heads"]), int(d["num_kv_heads"]), int(d["head_dim"])),
                      int(d["mlp_width"]))


# ---- the JSON form, checked field by field ---------------------------------------------------------
# Every key a plan may hold, per level. A key not listed is refused by name (a misspelt
# `remove_chanels` must not be dropped silently): extend these when a field is added.
TOP_KEYS = ("format", "version", "model", "settings", "params", "layers", "fusion", "scores", "block_scores",
            "compensation", "stages")
MODEL_KEYS = ("architecture", "family", "shapes")
SHAPE_KEYS = ("num_heads", "num_kv_heads", "head_dim", "mlp_width")
LAYER_KEYS = ("index", "remove_kv_groups", "remove_heads", "remove_channels", "remove_attention", "remove_mlp")
SETTINGS_KEYS = ("ratio", "estimators", "fusion", "fusion_options", "allocation", "allocation_options", "units",
                 "layers", "multiple", "stages")
PARAMS_KEYS = ("total_before", "total_after", "prunable_before", "removed", "prunable_fraction_removed")
FUSION_KEYS = ("policy", "options", "sites", "warnings", "training")
SITE_KEYS = ("layer", "level", "weights", "fallback")
SCORE_LEVELS = tuple(str(level) for level in Level)
OLD_SCORE_LEVELS = tuple(f"{kind}_block" for kind in BlockKind)  # version 2: block importance among the scores
BLOCK_KINDS = tuple(str(kind) for kind in BlockKind)
COMPENSATION_KEYS = ("projection", "positions", "mean")
MAX_UNITS = 1 << 20  # far above any real layer (heads, KV groups, head_dim, MLP channels); bounds the checks' work
FIX = "fix the plan file, or re-create it with Pruner.plan() and Plan.save()"


def _fail(where: str, problem: str) -> PlanError:
    return PlanError(f"The plan is corrupt: field {where}: {problem}; {FIX}.")


def _object(value: Any, where: str, known: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected an object, got {_kind(value)}")
    unknown = [key for key in value if key not in known]
    if unknown:
        raise PlanError(f"Plan field {where} has an unknown key {unknown[0]!r} (the known keys there are "
                        f"{', '.join(known)}): correct its spelling or remove it; a misspelt key would otherwise "
                        "be ignored.")
    missing = [key for key in required if key not in value]
    if missing:
        raise _fail(where, f"the required key {missing[0]!r} is missing")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _integer(value: Any, where: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"expected an integer, got {_kind(value)} {value!r}")
    if value < low or (high is not None and value > high):
        raise _fail(where, f"{value} is outside [{low}, {high if high is not None else 'inf'}]")
    return value


def _number(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _fail(where, f"expected a number, got {_kind(value)} {value!r}")
    if not math.isfinite(value):
        raise _fail(where, f"{value} is not a finite number")
    return float(value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected a string, got {_kind(value)} {value!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, f"expected a list, got {_kind(value)}")
    return value


def _indices(value: Any, where: str, limit: int) -> list[int]:
    values = _list(value, where)
    if values and not limit:
        raise _fail(where, "lists units of a layer that has none of them")
    values = [_integer(v, f"{where}[{i}]", 0, limit - 1) for i, v in enumerate(values)]
    if len(set(values)) != len(values):
        raise _fail(where, "lists an index twice")
    return values


def _json_value(value: Any, where: str, depth: int = 0) -> None:
    """Free-form JSON (estimator and fusion options, training records): plain values, finite numbers."""
    if depth > 32:
        raise _fail(where, "is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(where, f"has a key {key!r} that is not a string")
            _json_value(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _json_value(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float):
        _number(value, where)
    elif not (value is None or isinstance(value, (str, int, bool))):
        raise _fail(where, f"holds a {_kind(value)}, which JSON cannot hold")


def _check_shape(value: Any, where: str) -> LayerShape:
    d = _object(value, where, SHAPE_KEYS, SHAPE_KEYS)
    heads, kv, head_dim, width = (_integer(d[key], f"{where}.{key}", 0, MAX_UNITS) for key in SHAPE_KEYS)
    if (heads == 0) != (kv == 0) or (kv and heads % kv):
        raise _fail(where, f"{heads} query heads cannot be shared by {kv} KV heads (a whole number per group)")
    return LayerShape(AttentionShape(heads, kv, head_dim), width)


def _check_settings(value: Any) -> None:
    d = _object(value, "settings", SETTINGS_KEYS)
    _json_value(d, "settings")
    if "ratio" in d and _number(d["ratio"], "settings.ratio") < 0:
        raise _fail("settings.ratio", "is negative")
    for key in ("fusion", "allocation"):
        if key in d:
            _string(d[key], f"settings.{key}")
    for i, entry in enumerate(_list(d.get("estimators", []), "settings.estimators")):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _fail(f"settings.estimators[{i}]", "expected an object with a 'name' string")
    for i, unit in enumerate(_list(d.get("units", []), "settings.units")):
        _string(unit, f"settings.units[{i}]")
    for key in ("fusion_options", "allocation_options"):
        if key in d and not isinstance(d[key], dict):
            raise _fail(f"settings.{key}", f"expected an object, got {_kind(d[key])}")
    layers = d.get("layers")
    if isinstance(layers, list):
        for i, index in enumerate(layers):
            _integer(index, f"settings.layers[{i}]")
    elif isinstance(layers, int) and not isinstance(layers, bool):
        _integer(layers, "settings.layers")
    elif not (layers is None or isinstance(layers, str)):
        raise _fail("settings.layers", f"expected null, a layer index, a 'start:stop' string or a list of indices, "
                    f"got {_kind(layers)}")
    if "stages" in d and not isinstance(d["stages"], dict):
        raise _fail("settings.stages", f"expected an object, got {_kind(d['stages'])}")
    if "multiple" in d:
        _integer(d["multiple"], "settings.multiple", 1)


def _check_params(value: Any) -> None:
    d = _object(value, "params", PARAMS_KEYS)
    # A record of the planning run: a hand-edited plan keeps the old counts, so they are only type-checked.
    for key in PARAMS_KEYS[:4]:
        if key in d:
            _integer(d[key], f"params.{key}")
    if "prunable_fraction_removed" in d:
        fraction = _number(d["prunable_fraction_removed"], "params.prunable_fraction_removed")
        if not 0 <= fraction <= 1:
            raise _fail("params.prunable_fraction_removed", f"{fraction} is outside [0, 1]")


def _check_fusion(value: Any, layers: int) -> None:
    d = _object(value, "fusion", FUSION_KEYS)
    _json_value(d, "fusion")
    if "policy" in d:
        _string(d["policy"], "fusion.policy")
    if "options" in d and not isinstance(d["options"], dict):
        raise _fail("fusion.options", f"expected an object, got {_kind(d['options'])}")
    for i, warning in enumerate(_list(d.get("warnings", []), "fusion.warnings")):
        _string(warning, f"fusion.warnings[{i}]")
    if "training" in d and not isinstance(d["training"], dict):
        raise _fail("fusion.training", f"expected an object, got {_kind(d['training'])}")
    seen = set()
    for i, site in enumerate(_list(d.get("sites") or [], "fusion.sites")):
        where = f"fusion.sites[{i}]"
        site = _object(site, where, SITE_KEYS, ("layer", "level", "weights"))
        key = (_integer(site["layer"], f"{where}.layer", 0, layers - 1), _string(site["level"], f"{where}.level"))
        if key in seen:
            raise _fail(where, f"layer {key[0]} {key[1]} has a second entry")
        seen.add(key)
        if not isinstance(site["weights"], dict):
            raise _fail(f"{where}.weights", f"expected an object, got {_kind(site['weights'])}")
        for name, weight in site["weights"].items():
            _number(weight, f"{where}.weights.{name}")
        if "fallback" in site and not isinstance(site["fallback"], bool):
            raise _fail(f"{where}.fallback", f"expected true or false, got {site['fallback']!r}")


def _check_scores(value: Any, layers: int, version: int) -> None:
    d = _object(value, "scores", SCORE_LEVELS + (OLD_SCORE_LEVELS if version < 3 else ()))
    for level, per_layer in d.items():
        per_layer = _list(per_layer, f"scores.{level}")
        if len(per_layer) != layers:
            raise _fail(f"scores.{level}", f"has {len(per_layer)} layers, the plan {layers}")
        for i, values in enumerate(per_layer):
            for j, score in enumerate(_list(values, f"scores.{level}[{i}]")):
                _number(score, f"scores.{level}[{i}][{j}]")


def _check_block_scores(value: Any, layers: int) -> None:
    d = _object(value, "block_scores", BLOCK_KINDS)
    for kind, per_layer in d.items():
        per_layer = _list(per_layer, f"block_scores.{kind}")
        if len(per_layer) != layers:
            raise _fail(f"block_scores.{kind}", f"has {len(per_layer)} layers, the plan {layers}")
        for i, score in enumerate(per_layer):
            if score is not None:  # a layer whose block is already gone has no importance
                _number(score, f"block_scores.{kind}[{i}]")


def _check_compensation(value: Any) -> None:
    projections = set()
    for i, entry in enumerate(_list(value, "compensation")):
        where = f"compensation[{i}]"
        entry = _object(entry, where, COMPENSATION_KEYS, COMPENSATION_KEYS)
        projection = _string(entry["projection"], f"{where}.projection")
        if projection in projections:
            raise _fail(where, f"compensates {projection} a second time (its bias would be shifted twice)")
        projections.add(projection)
        positions = _indices(entry["positions"], f"{where}.positions", MAX_UNITS)
        if positions != sorted(positions):
            raise _fail(f"{where}.positions", "is not in increasing order")
        means = [_number(v, f"{where}.mean[{j}]") for j, v in enumerate(_list(entry["mean"], f"{where}.mean"))]
        if len(means) != len(positions):
            raise _fail(where, f"has {len(means)} means for {len(positions)} positions")


def check_plan_dict(data: Any) -> None:
    """Raise PlanError, naming the field and the fix, unless `data` is a well-formed plan (JSON form).

    Known keys only at every level, the right types, finite numbers, no index or compensation entry
    twice, unit indices inside the plan's own layer shapes and every floor `validate` holds; nothing
    is converted or dropped, so a plan that passes means exactly what its JSON says.
    """
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError("This is not an adaprune plan (the 'format' field is missing or wrong); "
                        "make one with Pruner.plan() and save it with Plan.save().")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise PlanError(f"Plan version {version!r} is not supported by this adaprune "
                        f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-create the plan "
                        "with this version.")
    _object(data, "(top level)", TOP_KEYS, ("model", "layers"))
    model = _object(data["model"], "model", MODEL_KEYS, MODEL_KEYS)
    _string(model["architecture"], "model.architecture")
    _string(model["family"], "model.family")
    shapes = [_check_shape(d, f"model.shapes[{i}]") for i, d in enumerate(_list(model["shapes"], "model.shapes"))]
    entries = _list(data["layers"], "layers")
    if not entries or len(entries) != len(shapes):
        raise _fail("layers", f"has {len(entries)} entries for the {len(shapes)} layers of model.shapes")
    for i, (entry, shape) in enumerate(zip(entries, shapes)):
        where = f"layers[{i}]"
        entry = _object(entry, where, LAYER_KEYS, ("index",))
        if _integer(entry["index"], f"{where}.index") != i:
            raise _fail(f"{where}.index", f"says layer {entry['index']}; entries must list layers 0, 1, 2, ... in order")
        limits = {"remove_kv_groups": shape.attention.num_kv_heads, "remove_heads": shape.attention.num_heads,
                  "remove_channels": shape.mlp_width}
        fields = {key: _indices(entry.get(key, []), f"{where}.{key}", limit) for key, limit in limits.items()}
        for key in ("remove_attention", "remove_mlp"):
            if not isinstance(entry.get(key, False), bool):
                raise _fail(f"{where}.{key}", f"expected true or false, got {entry[key]!r}")
        _validate_layer(i, LayerPlan(i, **fields, remove_attention=entry.get("remove_attention", False),
                                     remove_mlp=entry.get("remove_mlp", False)), shape)
    if "settings" in data:
        _check_settings(data["settings"])
    if "params" in data:
        _check_params(data["params"])
    if "fusion" in data:
        _check_fusion(data["fusion"], len(shapes))
    if "scores" in data:
        _check_scores(data["scores"], len(shapes), version)
    if "block_scores" in data:
        _check_block_scores(data["block_scores"], len(shapes))
    if "stages" in data:
        if not isinstance(data["stages"], dict):
            raise _fail("stages", f"expected an object, got {_kind(data['stages'])}")
        _json_value(data["stages"], "stages")
    if "compensation" in data:
        _check_compensation(data["compensation"])


def kept_positions(owners: Sequence[tuple[str, int]], block: int, keeps: Callable[[tuple[str, int]], bool]) -> torch.Tensor:
    """Indices along a projection's pruned axis that survive, given its block owners."""
    kept = [i * block + j for i, owner in enumerate(owners) if keeps(owner) for j in range(block)]
    return torch.tensor(kept, dtype=torch.long)
