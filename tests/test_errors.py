"""Bad input gets a clear error naming the fix, and the model is left exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from adaprune import (
    CalibrationError,
    ConfigurationError,
    EstimatorError,
    Plan,
    PlanError,
    Pruner,
    UnsupportedArchitectureError,
)
from conftest import random_batches
from families import FAMILIES, Shape, build


def snapshot(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_unknown_architecture_names_the_class_and_the_doc():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*docs/adding-a-family.md"):
        Pruner(model)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratio_outside_unit_interval(tiny_gqa, ratio):
    with pytest.raises(ConfigurationError, match=r"ratio must be in \[0, 1\)"):
        Pruner(tiny_gqa, ratio=ratio)


def test_plan_removing_every_kv_group_is_refused_before_any_change(tiny_gqa):
    before = snapshot(tiny_gqa)
    pruner = Pruner(tiny_gqa, ratio=0.2, estimators=["magnitude"], progress=False)
    plan = pruner.plan()
    plan.layers[0].remove_channels = [0, 1, 2]
    plan.layers[-1].remove_kv_groups = [0, 1]  # the last layer: earlier layers would be touched first
    for mode in ("slice", "mask"):
        with pytest.raises(PlanError, match="removes all 2 KV groups"):
            pruner.apply(plan, mode=mode)
        assert_unchanged(tiny_gqa, before)


def test_uneven_heads_per_group_is_refused(tiny_gqa):
    pruner = Pruner(tiny_gqa, estimators=["magnitude"], progress=False)
    plan = pruner.plan()
    plan.layers[1].remove_heads = [0]  # group 0 keeps 2 heads, group 1 keeps 3
    with pytest.raises(PlanError, match="same number"):
        pruner.apply(plan)


def test_empty_calibration_is_refused_and_model_unchanged(tiny_gqa):
    before = snapshot(tiny_gqa)
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        Pruner(tiny_gqa, estimators=["taylor"], progress=False).plan([])
    assert_unchanged(tiny_gqa, before)
    assert all(p.grad is None for p in tiny_gqa.parameters())


def test_missing_calibration_names_the_estimator(tiny_gqa):
    with pytest.raises(ConfigurationError, match="taylor.*need calibration"):
        Pruner(tiny_gqa, estimators=["taylor"], progress=False).plan()


def test_plan_for_another_model_is_refused(tiny_gqa):
    other = build(FAMILIES[0], Shape(layers=3, kv_heads=2, heads_per_group=3, head_dim=8, width=48))
    plan = Pruner(other, estimators=["magnitude"], progress=False).plan()
    before = snapshot(tiny_gqa)
    with pytest.raises(PlanError, match="another"):
        Pruner(tiny_gqa, progress=False).apply(plan)
    assert_unchanged(tiny_gqa, before)


def test_applying_twice_is_refused(tiny_gqa):
    pruner = Pruner(tiny_gqa, ratio=0.3, estimators=["magnitude"], progress=False)
    plan = pruner.plan()
    pruner.apply(plan)
    with pytest.raises(PlanError, match="already pruned"):
        pruner.apply(plan)


def test_corrupt_plan_files(tmp_path, tiny_gqa):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(PlanError, match="not an adaprune plan"):
        Plan.load(path)
    plan = Pruner(tiny_gqa, estimators=["magnitude"], progress=False).plan()
    data = plan.to_dict()
    data["layers"][0]["remove_channels"] = ["x"]
    with pytest.raises(PlanError, match="corrupt"):
        Plan.from_dict(data)
    data = plan.to_dict()
    data["version"] = 99
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict(data)
    data = plan.to_dict()
    data["layers"][0]["remove_channels"] = [0, 0]
    with pytest.raises(PlanError, match="twice"):
        Pruner(tiny_gqa, progress=False).apply(Plan.from_dict(data))
    data["layers"][0]["remove_channels"] = [10_000]
    with pytest.raises(PlanError, match="outside"):
        Pruner(tiny_gqa, progress=False).apply(Plan.from_dict(data))


def test_unknown_estimator_lists_available(tiny_gqa):
    with pytest.raises(EstimatorError, match="Available: .*magnitude.*taylor"):
        Pruner(tiny_gqa, estimators=["nope"])


@pytest.mark.parametrize("kwargs, match", [
    ({"fusion": "nope"}, "Available"),
    ({"allocation": "nope"}, "Available"),
    ({"units": ["nope"]}, "Unknown unit"),
    ({"mode": "nope"}, "mode"),
    ({"layers": [7]}, "has 3 layers"),
])
def test_bad_arguments(tiny_gqa, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        Pruner(tiny_gqa, **kwargs)


def test_ratio_too_high_for_eligible_layers(tiny_gqa):
    pruner = Pruner(tiny_gqa, ratio=0.6, estimators=["magnitude"], layers=[0], progress=False)
    with pytest.raises(ConfigurationError, match="eligible"):
        pruner.plan()


def test_plan_does_not_touch_the_model(tiny_gqa):
    before = snapshot(tiny_gqa)
    requires = [p.requires_grad for p in tiny_gqa.parameters()]
    Pruner(tiny_gqa, estimators=["taylor"], progress=False).plan(random_batches(97))
    assert_unchanged(tiny_gqa, before)
    assert [p.requires_grad for p in tiny_gqa.parameters()] == requires
    assert all(p.grad is None for p in tiny_gqa.parameters())
