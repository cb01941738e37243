"""Hypothesis fuzzing of plan JSON: random mutations of valid plans are always either refused with a
PlanError or read as a valid plan that means exactly what the JSON says; never another exception,
never a silent change.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaprune import Plan, PlanError, Pruner
from adaprune.plugins import unit_table
from conftest import random_batches
from families import FAMILIES, Shape, build

BY_NAME = {family.name: family for family in FAMILIES}
SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=4, width=16)


def _world(name: str, compensate: bool):
    model = build(BY_NAME[name], SHAPE)
    estimators = [{"name": "fluctuation", "compensate": True}] if compensate else ["taylor"]
    pruner = Pruner(model, ratio=0.3, estimators=estimators, fusion="fixed", reconstruct=False, progress=False)
    plan = pruner.plan(random_batches(SHAPE.vocab, count=1, seq=6))
    if compensate:
        assert plan.compensation, "the base plan should exercise compensation entries"
    return model, plan.to_dict()


@pytest.fixture(scope="module")
def worlds():
    # A GQA model with bias compensation entries, and a fused-projection family.
    return [_world("llama-untied-biased", compensate=True), _world("bloom", compensate=False)]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, the root included."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _get(node, path):
    for key in path:
        node = node[key]
    return node


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(2**70), 2**70),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, -1.0, 1e308, 2.0]),
    st.text(max_size=6), st.sampled_from(["remove_chanels", "attention", "kv_group", "0"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)
MUTATIONS = ("replace", "delete", "add_key", "duplicate", "append", "swap_type")


@st.composite
def mutated(draw, base: dict) -> dict:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path, value = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(MUTATIONS))
        if not path:
            kind = "add_key"
        parent = _get(data, path[:-1]) if path else None
        if kind == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "add_key" and isinstance(value, dict):
            value[draw(st.sampled_from(["remove_chanels", "extra", "index", "mean", "layers", "scores"]))] = \
                draw(JSON_VALUES)
        elif kind == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(draw(st.sampled_from(value))))
        elif kind == "append" and isinstance(value, list):
            value.append(draw(JSON_VALUES))
        elif kind == "swap_type" and path:
            parent[path[-1]] = {"int": str, "str": lambda v: [v], "list": lambda v: {"x": v}, "dict": lambda v: [v],
                                "float": int, "bool": int, "NoneType": lambda v: 0}.get(
                type(value).__name__, lambda v: None)(value) if not isinstance(value, float) or math.isfinite(value) \
                else 0
    return data


def _normal(data: dict) -> dict:
    """The JSON as a plan reads it: empty optional sections are not written back."""
    data = json.loads(json.dumps(data))
    defaults = {"remove_kv_groups": [], "remove_heads": [], "remove_channels": [], "remove_attention": False,
                "remove_mlp": False}
    data["layers"] = [{**defaults, **layer} for layer in data["layers"]]  # keys left out take their defaults
    for key in ("compensation", "block_scores", "stages", "settings", "params", "fusion", "scores"):
        if not data.get(key):
            data.pop(key, None)
    return data


def _check(model: torch.nn.Module, data: dict) -> str:
    """Read `data` as a plan; if valid, it must say what the JSON says and slice a model to that."""
    text = json.dumps(data)  # NaN and inf are written as the JSON extensions Python reads back
    try:
        plan = Plan.from_dict(json.loads(text))
    except PlanError:
        return "refused"
    # Nothing dropped, converted or added: the plan is the JSON.
    got, want = _normal(plan.to_dict()), _normal(json.loads(text) | {"version": plan.version})
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    sliced = copy.deepcopy(model)
    try:
        Pruner(sliced, ratio=0.0, estimators=["magnitude"], fusion="fixed", reconstruct=False,
               progress=False).apply(plan)
    except PlanError:
        return "refused on apply"
    table = unit_table(sliced)
    assert [shape.to_dict() for shape in table.shapes] == [s.to_dict() for s in plan.pruned_shapes()]
    removed = unit_table(model).count_removed(plan.layers)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in sliced.parameters()) == removed
    return "valid"


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def test_mutated_plans_are_refused_or_exact(worlds):
    outcomes = {}

    @FUZZ
    @given(data=st.data(), which=st.integers(0, len(worlds) - 1))
    def check(data, which):
        model, base = worlds[which]
        outcome = _check(model, data.draw(mutated(base)))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    check()
    print("fuzz outcomes:", outcomes)
    assert outcomes.get("refused", 0) > 0 and outcomes.get("valid", 0) > 0, outcomes


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_damaged_plan_files_are_refused_or_exact(worlds, tmp_path_factory, data):
    """Truncated and byte-flipped files (a half-written or damaged plan) never raise anything but PlanError."""
    model, base = worlds[0]
    raw = bytearray(json.dumps(base, indent=1).encode())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "plan.json"
    path.write_bytes(bytes(raw))
    try:
        plan = Plan.load(path)
    except PlanError:
        return
    assert _check(model, plan.to_dict()) in ("valid", "refused on apply")


def test_the_valid_base_plans_round_trip(worlds):
    for model, base in worlds:
        assert _check(model, base) == "valid"
