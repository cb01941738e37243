"""Calibrate once, prune many times: a ScoreCache plans again with no forward pass, and fits one model only."""

from __future__ import annotations

import pytest

from adaprune import ConfigurationError, Pruner, ScoreCache
from conftest import random_batches
from families import FAMILIES, Shape, build
from test_estimators import SHAPE, ForwardCounter

ESTIMATORS = ["taylor", "activation", "magnitude"]  # magnitude: coarse and fine share a tensor


@pytest.fixture
def scored(tmp_path):
    model = build(FAMILIES[0], SHAPE)
    batches = random_batches(SHAPE.vocab)
    cache = Pruner(model, estimators=ESTIMATORS, progress=False).score(batches)
    path = tmp_path / "scores.safetensors"
    cache.save(path)
    return model, batches, cache, path


def test_plans_from_a_saved_cache_need_no_forward_pass(scored):
    model, batches, cache, path = scored
    loaded = ScoreCache.load(path)
    counter = ForwardCounter(model)
    for ratio, fusion in ((0.1, "fixed"), (0.3, "coarse"), (0.3, "fine")):
        pruner = Pruner(model, ratio=ratio, estimators=ESTIMATORS, fusion=fusion, progress=False)
        assert pruner.plan(scores=loaded).to_dict() == pruner.plan(scores=cache).to_dict()
    assert counter.count == 0
    fresh = Pruner(model, ratio=0.3, estimators=ESTIMATORS, fusion="fixed", progress=False)
    assert fresh.plan(batches).layers == fresh.plan(scores=loaded).layers


def test_a_subset_of_the_cached_estimators_may_be_planned(scored):
    model, _, cache, _ = scored
    plan = Pruner(model, ratio=0.2, estimators=["activation"], fusion="fixed", progress=False).plan(scores=cache)
    assert [e["name"] for e in plan.settings["estimators"]] == ["activation"]


def test_a_cache_for_another_model_is_refused(scored):
    _, _, _, path = scored
    other = build(FAMILIES[0], Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=4, width=24))
    with pytest.raises(ConfigurationError, match="another model.*layer 0"):
        Pruner(other, estimators=ESTIMATORS, progress=False).plan(scores=ScoreCache.load(path))


@pytest.mark.parametrize("estimators, match", [
    (["fluctuation"], "not of estimator 'fluctuation'"),
    ([{"name": "taylor", "order": 2}], "made with"),
])
def test_a_cache_of_other_estimators_is_refused(scored, estimators, match):
    model, _, _, path = scored
    with pytest.raises(ConfigurationError, match=match):
        Pruner(model, estimators=estimators, progress=False).plan(scores=ScoreCache.load(path))


def test_a_file_that_is_no_cache_is_refused(tmp_path):
    path = tmp_path / "nope.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigurationError, match="score cache"):
        ScoreCache.load(path)
