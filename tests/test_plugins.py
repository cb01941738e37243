"""Third-party estimators: an installed package is discovered through its entry point; bad ones are refused."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaprune import ConfigurationError, EstimatorError, Pruner, list_estimators
from adaprune import Estimator, hookimpl
from adaprune.plugins import plugin_manager
from adaprune.vocabulary import LEVELS
from conftest import random_batches
from families import FAMILIES, build
from test_estimators import SHAPE, assert_unchanged, snapshot

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adaprune-random-plugin"
TEST_PLUGINS = Path(__file__).resolve().parent / "plugin_package"


def pip_install(source: Path, target: Path) -> None:
    """Install `source` into the folder `target`, offline where the build backend is already here."""
    offline = importlib.util.find_spec("setuptools") is not None
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)]
    command[4:4] = ["--no-build-isolation", "--no-index"] if offline else []
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)


def install(package: Path, module: str, tmp_path: Path):
    """`package` installed into a temporary folder put on sys.path; all undone afterwards."""
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(package, source)  # the build writes next to its sources: keep the checkout clean
    pip_install(source, target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    plugin_manager.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(target))
        sys.modules.pop(module, None)
        importlib.invalidate_caches()
        plugin_manager.cache_clear()


@pytest.fixture
def installed_plugin(tmp_path):
    """The example estimator plugin, installed through its entry point."""
    yield from install(EXAMPLE, "adaprune_random", tmp_path)


@pytest.fixture
def installed_policy_and_allocation(tmp_path):
    """A package registering a fusion policy and an allocation through their entry-point groups."""
    yield from install(TEST_PLUGINS, "adaprune_test_plugins", tmp_path)


def test_an_installed_fusion_policy_and_allocation_are_used(installed_policy_and_allocation):
    assert plugin_manager().get_plugin("first-candidate") is not None
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.25, estimators=["magnitude"], fusion="first-candidate",
                    allocation="leading-channels", units=["channels"], progress=False)
    plan = pruner.plan()
    assert plan.fusion["policy"] == "first-candidate" and plan.settings["allocation"] == "leading-channels"
    assert all(list(site["weights"]) == ["magnitude/coarse"] for site in plan.fusion["sites"])
    assert all(layer.remove_channels == [0, 1, 2, 3] for layer in plan.layers)  # 25% of 16, from the front
    pruner.apply(plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params["total_after"]


def test_unknown_policy_and_allocation_name_the_entry_point_groups():
    with pytest.raises(ConfigurationError, match="Available: adaptive, coarse, fine, fixed.*adaprune.fusion_policies"):
        Pruner(build(FAMILIES[0], SHAPE), fusion="nope")
    with pytest.raises(ConfigurationError, match="Available: global, uniform.*adaprune.allocations"):
        Pruner(build(FAMILIES[0], SHAPE), allocation="nope")


def test_an_installed_plugin_is_discovered_and_prunes(installed_plugin):
    assert "random" in list_estimators()
    assert plugin_manager().get_plugin("random") is not None  # registered under its entry-point name
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=[{"name": "random", "seed": 3}], fusion="fixed", progress=False)
    plan = pruner.plan()
    assert plan.settings["estimators"] == [{"name": "random", "seed": 3}]
    assert plan.layers == pruner.plan().layers  # seeded
    pruner.apply(plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params["total_after"] < plan.params["total_before"]


def test_unknown_estimator_lists_every_available_one():
    with pytest.raises(EstimatorError, match="Available: activation, fluctuation, learned, magnitude, taylor"):
        Pruner(build(FAMILIES[0], SHAPE), estimators=["nope"])


# ---- bad plugins ------------------------------------------------------------------------------
def constant_scores(graph, value):
    return {"coarse": {level: [torch.full((layer.num_units[level],), value) for layer in graph] for level in LEVELS}}


class WrongShape(Estimator):
    name = "wrong_shape"

    def score(self, model, graph, stats):
        scores = constant_scores(graph, 1.0)
        scores["coarse"]["channel"][0] = torch.ones(3)
        return scores


class NotANumber(Estimator):
    name = "not_a_number"

    def score(self, model, graph, stats):
        return constant_scores(graph, float("nan"))


class Infinite(Estimator):
    name = "infinite"

    def score(self, model, graph, stats):
        return constant_scores(graph, float("inf"))


class Crashes(Estimator):
    name = "crashes"

    def score(self, model, graph, stats):
        raise RuntimeError("boom")


class WantsTheMoon(Estimator):
    name = "wants_the_moon"
    needs = frozenset({"weights", "the_moon"})


class BadPlugin:
    @hookimpl
    def adaprune_estimators(self):
        return [WrongShape, NotANumber, Infinite, Crashes, WantsTheMoon]


@pytest.fixture
def bad_plugin():
    plugin = BadPlugin()
    plugin_manager().register(plugin, name="bad-plugin")
    try:
        yield
    finally:
        plugin_manager().unregister(plugin)


@pytest.mark.parametrize("name, match", [
    ("wrong_shape", "returned 3 channel scores"),
    ("not_a_number", "NaN or infinite"),
    ("infinite", "NaN or infinite"),
    ("crashes", "failed while scoring: RuntimeError: boom"),
])
def test_bad_scores_are_refused_naming_the_plugin_and_the_model_is_untouched(bad_plugin, name, match):
    model = build(FAMILIES[0], SHAPE)
    before = snapshot(model)
    pruner = Pruner(model, ratio=0.3, estimators=[name], fusion="fixed", progress=False)
    with pytest.raises(EstimatorError, match=f"'{name}' \\(plugin 'bad-plugin'\\).*{match}"):
        pruner.plan(random_batches(SHAPE.vocab))
    assert_unchanged(model, before)


def test_an_unknown_need_is_refused_naming_the_plugin(bad_plugin):
    with pytest.raises(EstimatorError, match="'wants_the_moon' \\(plugin 'bad-plugin'\\) needs \\['the_moon'\\]"):
        Pruner(build(FAMILIES[0], SHAPE), estimators=["wants_the_moon"])
