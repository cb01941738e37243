"""The Plan: a plain, JSON-serialisable record of what to remove, and why.

Everything before the Plan decides; everything after it acts. A plan names units by their
index in the model it was made for, and records that model's layer shapes so that it is
refused, before any tensor is touched, by a model of another shape.
"""

from __future__ import annotations

import json
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
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError("This is not an adaprune plan (the 'format' field is missing or wrong); "
                            "make one with Pruner.plan() and save it with Plan.save().")
        if data.get("version") not in READABLE_VERSIONS:
            raise PlanError(f"Plan version {data.get('version')!r} is not supported by this adaprune "
                            f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); re-create the plan "
                            "with this version.")
        try:
            layers = [LayerPlan(int(d["index"]), _int_list(d.get("remove_kv_groups", [])),
                                _int_list(d.get("remove_heads", [])), _int_list(d.get("remove_channels", [])),
                                _bool(d.get("remove_attention", False)), _bool(d.get("remove_mlp", False)))
                      for d in data["layers"]]
            model = dict(data["model"])
            [_shape_from_dict(d) for d in model["shapes"]]
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"The plan is corrupt ({type(error).__name__}: {error}); re-create it with "
                            "Pruner.plan().") from error
        compensation = data.get("compensation", [])
        if not isinstance(compensation, list) or not all(isinstance(entry, dict) for entry in compensation):
            raise PlanError("The plan's 'compensation' is not a list of entries; the plan is corrupt, re-create it.")
        scores, block_scores = dict(data.get("scores", {})), dict(data.get("block_scores", {}))
        for kind in BlockKind:  # version 2 kept the block importance among the unit scores
            if f"{kind}_block" in scores:
                block_scores[str(kind)] = [values[0] if values else None for values in scores.pop(f"{kind}_block")]
        # An older plan is read into the current format, and saved as such.
        return cls(model=model, layers=layers, settings=data.get("settings", {}), params=data.get("params", {}),
                   fusion=data.get("fusion", {}), scores=scores, block_scores=block_scores, compensation=compensation,
                   stages=data.get("stages", {}))

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON, atomically: a failed write leaves the previous file as it was."""
        write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise PlanError(f"{path} is not valid JSON ({error}); the plan file is corrupt, re-create it.") from error
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


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _int_list(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"expected a list of integers, got {values!r}")
    return list(values)


def kept_positions(owners: Sequence[tuple[str, int]], block: int, keeps: Callable[[tuple[str, int]], bool]) -> torch.Tensor:
    """Indices along a projection's pruned axis that survive, given its block owners."""
    kept = [i * block + j for i, owner in enumerate(owners) if keeps(owner) for j in range(block)]
    return torch.tensor(kept, dtype=torch.long)
