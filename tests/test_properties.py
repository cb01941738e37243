"""The shared property suite: run on every family of tests/families.py, over random shapes and plans."""

from __future__ import annotations

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM

from adaprune import LayerPlan, Plan, Pruner, detect_spec, unit_table
from adaprune.vocabulary import LEVELS
from families import Shape, build

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def shapes(draw, grouped_query: bool = True):
    return Shape(
        layers=draw(st.integers(1, 3)),
        kv_heads=draw(st.integers(1, 4)),
        heads_per_group=draw(st.integers(1, 3)) if grouped_query else 1,
        head_dim=draw(st.sampled_from([4, 8])),
        width=draw(st.integers(2, 24)),
    )


def random_plan(draw, model: nn.Module) -> Plan:
    """A valid plan drawn at random: any subset of groups, the same number of heads per kept group, any channels.

    Where the family can run without them, a layer sometimes loses its whole attention or MLP block.
    """
    pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False)
    plan = pruner.plan()
    removable = detect_spec(model).removable_blocks()
    for layer, shape in zip(plan.layers, plan.shapes):
        layer.remove_attention = "attention" in removable and draw(st.integers(0, 3)) == 0
        layer.remove_mlp = "mlp" in removable and draw(st.integers(0, 3)) == 0
        attention = shape.attention
        groups = list(range(attention.num_kv_heads))
        layer.remove_kv_groups = sorted(draw(st.lists(st.sampled_from(groups), unique=True,
                                                      max_size=attention.num_kv_heads - 1)))
        per_group = attention.heads_per_group
        drop = draw(st.integers(0, per_group - 1))
        for g in groups:
            if g not in layer.remove_kv_groups:
                heads = list(range(g * per_group, (g + 1) * per_group))
                layer.remove_heads += sorted(draw(st.permutations(heads))[:drop])
        layer.remove_channels = sorted(draw(st.lists(st.integers(0, shape.mlp_width - 1), unique=True,
                                                     max_size=shape.mlp_width - 1)))
        if layer.remove_attention:  # the whole block goes: no unit of it is listed
            layer.remove_kv_groups, layer.remove_heads = [], []
        if layer.remove_mlp:
            layer.remove_channels = []
    removed = unit_table(model).count_removed(plan.layers)
    plan.params["total_after"] = plan.params["total_before"] - removed
    return plan


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_row_and_column_has_exactly_one_owner_per_level(family):
    @SETTINGS
    @given(shape=shapes(family.grouped_query))
    def check(shape):
        model = build(family, shape)
        graph = unit_table(model)
        for layer in graph:
            layer_module = model.get_submodule(layer.path)
            linears = {f"{layer.path}.{name}" for name, m in layer_module.named_modules() if isinstance(m, nn.Linear)}
            covered = set()
            for level in LEVELS:
                seen: dict[tuple[str, int], int] = {}
                for member in layer.members[level]:
                    param = model.get_parameter(member.param_name)
                    assert member.owner.numel() == param.shape[member.dim]
                    owned = member.owner[member.owner >= 0]
                    assert owned.max() < layer.num_units[level]
                    seen[(member.param_name, member.dim)] = seen.get((member.param_name, member.dim), 0) + 1
                    covered.add(member.module_path)
                    if level != "head":  # a query head owns no k/v rows; every other level owns all
                        assert bool((member.owner >= 0).all()), f"{member.param_name}: unowned positions at {level}"
                assert all(count == 1 for count in seen.values()), f"{level}: a parameter is listed twice"
                # every unit owns something
                counts = layer.unit_param_counts(level)
                assert bool((counts > 0).all())
            assert covered == linears, f"Linear layers left out of the graph: {linears - covered}"
            # a KV group owns exactly its query heads' q/o slices plus its own k/v rows
            per_group = layer.shape.attention.heads_per_group
            heads = layer.unit_param_counts("head").view(-1, per_group).sum(1)
            assert bool((layer.unit_param_counts("kv_group") > heads).all())

    check()


def test_sliced_model_runs_with_predicted_size_and_matches_masked(family):
    @SETTINGS
    @given(data=st.data(), shape=shapes(family.grouped_query))
    def check(data, shape):
        model = build(family, shape)
        ids = torch.randint(0, shape.vocab, (2, 9), generator=torch.Generator().manual_seed(1))
        plan = random_plan(data.draw, model)
        pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False)
        with torch.no_grad():
            dense = model(input_ids=ids).logits
            pruner.apply(plan, mode="mask")
            masked = model(input_ids=ids).logits
            pruner.restore()
            torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)
            pruner.apply(plan, mode="slice")
            sliced = model(input_ids=ids).logits
        assert n_params(model) == plan.params["total_after"]
        torch.testing.assert_close(sliced, masked, rtol=0, atol=1e-5)
        assert [s.to_dict() for s in unit_table(model).shapes] == [s.to_dict() for s in plan.pruned_shapes()]

    check()


def test_plan_json_round_trip_is_exact(family):
    @SETTINGS
    @given(data=st.data(), shape=shapes(family.grouped_query))
    def check(data, shape):
        model = build(family, shape)
        plan = random_plan(data.draw, model)
        text = json.dumps(plan.to_dict())
        again = Plan.from_dict(json.loads(text))
        assert again.to_dict() == plan.to_dict()
        assert json.dumps(again.to_dict()) == text

    check()


def test_save_then_plain_reload_gives_same_logits(family, tmp_path_factory):
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data(), shape=shapes(family.grouped_query))
    def check(data, shape):
        model = build(family, shape)
        ids = torch.randint(0, shape.vocab, (1, 7), generator=torch.Generator().manual_seed(2))
        plan = random_plan(data.draw, model)
        Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False).apply(plan)
        folder = tmp_path_factory.mktemp("pruned")
        model.save_pretrained(folder)
        remote = family.trust_remote_code or bool(getattr(model.config, "auto_map", None))
        reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert n_params(reloaded) == n_params(model)

    check()


def test_uniform_plan_reloads_with_stock_classes(tmp_path):
    """Same shapes in every layer, head counts the stock config accepts: no remote code at all."""
    from families import FAMILIES

    model = build(FAMILIES[0], Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=32))
    plan = Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False).plan()
    for layer in plan.layers:
        layer.remove_kv_groups, layer.remove_channels = [1], list(range(16))
    Pruner(model, ratio=0.0, estimators=["magnitude"], progress=False).apply(plan)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and "per_layer_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
