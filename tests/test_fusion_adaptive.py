"""The adaptive fusion policy: a trained attention over candidate scores, per site."""

import math

import pytest
import torch

from adaprune import ConfigurationError, Pruner
from adaprune.plugins import create_policy
from conftest import random_batches

FAST = {"steps": 6, "eval_every": 3, "batch_size": 8}


def adaptive_pruner(model, **options):
    # Uniform allocation: the fixed-count case (test_trains_under_global_allocation has the other).
    return Pruner(model, ratio=0.5, estimators=[{"name": "taylor", "order": 2}], fusion="adaptive",
                  fusion_options={**FAST, **options}, allocation="uniform", progress=False)


def site_weights(plan):
    return {(s["layer"], s["level"]): s["weights"] for s in plan.fusion["sites"]}


def test_weights_are_a_distribution_per_site(tiny_gqa):
    plan = adaptive_pruner(tiny_gqa).plan(random_batches(97))
    assert plan.fusion["policy"] == "adaptive"
    for weights in site_weights(plan).values():
        assert set(weights) == {"taylor/coarse", "taylor/fine"}
        assert all(w >= 0 for w in weights.values())
        assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-5)
    assert all(math.isfinite(v) for per_layer in plan.scores.values() for layer in per_layer for v in layer)


def test_deterministic_under_a_seed(tiny_gqa):
    first = adaptive_pruner(tiny_gqa, seed=3).plan(random_batches(97))
    second = adaptive_pruner(tiny_gqa, seed=3).plan(random_batches(97))
    assert site_weights(first) == site_weights(second)
    assert [layer.remove_channels for layer in first.layers] == [layer.remove_channels for layer in second.layers]
    assert first.fusion["training"] == second.fusion["training"]


def test_weights_differ_across_sites(tiny_gqa):
    plan = adaptive_pruner(tiny_gqa, steps=10, keep_best=False).plan(random_batches(97))
    trained = [tuple(w.values()) for (_, level), w in site_weights(plan).items() if level in ("kv_group", "channel")]
    assert len(set(trained)) > 1, trained


def test_model_unchanged_after_planning(tiny_gqa):
    tiny_gqa.train()
    before = {name: p.detach().clone() for name, p in tiny_gqa.named_parameters()}
    grads = {name: p.requires_grad for name, p in tiny_gqa.named_parameters()}
    batches = random_batches(97)
    with torch.no_grad():
        logits = tiny_gqa.eval()(input_ids=batches[0]).logits
    tiny_gqa.train()
    adaptive_pruner(tiny_gqa).plan(batches)
    assert tiny_gqa.training
    for name, p in tiny_gqa.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.requires_grad == grads[name] and p.grad is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_gqa.modules())
    with torch.no_grad():
        assert torch.equal(tiny_gqa.eval()(input_ids=batches[0]).logits, logits)


def test_constant_candidates_fall_back_to_coarse_without_nan(tiny_gqa):
    pruner = adaptive_pruner(tiny_gqa)
    scores = pruner.score(random_batches(97))
    raw = {name: {g: {level: [t.clone() for t in per_layer] for level, per_layer in by_level.items()}
                  for g, by_level in by_granularity.items()} for name, by_granularity in scores.items()}
    for granularity in ("coarse", "fine"):
        raw["taylor"][granularity]["channel"][1] = torch.zeros_like(raw["taylor"][granularity]["channel"][1])
    plan = pruner.plan(random_batches(97), scores=raw)
    assert any("layer 1 channel" in w for w in plan.fusion["warnings"])
    assert site_weights(plan)[(1, "channel")] == {}
    assert all(math.isfinite(v) for per_layer in plan.scores.values() for layer in per_layer for v in layer)


def test_training_loss_goes_down(tiny_gqa):
    # One batch of all calibration rows: every step sees the same data, so the losses compare.
    plan = adaptive_pruner(tiny_gqa, steps=15, lr=0.1, batch_size=64).plan(random_batches(97, count=4))
    losses = plan.fusion["training"]["losses"]
    assert len(losses) == 15
    assert min(losses[-3:]) < losses[0]
    checks = plan.fusion["training"]["hard_checks"]
    chosen = next(c for c in checks if c["step"] == plan.fusion["training"]["chosen_step"])
    assert chosen["loss"] <= checks[0]["loss"]


def test_without_calibration_batches_uses_the_equal_blend(tiny_gqa):
    pruner = Pruner(tiny_gqa, ratio=0.3, estimators=["magnitude"], fusion="adaptive", progress=False)
    plan = pruner.plan()
    assert all(w and all(math.isclose(v, 1 / len(w)) for v in w.values()) for w in site_weights(plan).values())


def test_adaptive_is_the_default_and_listed():
    with pytest.raises(ConfigurationError, match="adaptive"):
        create_policy("no-such-policy")
    import inspect
    assert inspect.signature(Pruner).parameters["fusion"].default == "adaptive"


def test_bad_options_are_refused():
    with pytest.raises(ConfigurationError, match="objective"):
        create_policy("adaptive", objective="mse")
    with pytest.raises(ConfigurationError):
        create_policy("adaptive", steps=-1)


def test_trains_under_global_allocation(tiny_gqa):
    pruner = Pruner(tiny_gqa, ratio=0.4, estimators=[{"name": "taylor", "order": 2}], fusion="adaptive",
                    fusion_options=FAST, allocation="global", progress=False)
    plan = pruner.plan(random_batches(97))
    assert plan.fusion["training"]["steps"] == FAST["steps"]
    assert 0.3 < plan.params["prunable_fraction_removed"] < 0.5
    for weights in site_weights(plan).values():
        assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-5)
