"""Global allocation and whole-block removal: the budget, the structural rules, and a model without blocks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaprune import ConfigurationError, LayerPlan, Plan, PlanError, Pruner, UnitTable, unit_table
from adaprune.allocation.base import AllocationScores, check_units
from adaprune.allocation.budget import Budget, eligible_layers
from adaprune.allocation.ranked import GlobalAllocator
from adaprune.plugins import allocator_classes, create_allocator
from adaprune.scoring.candidates import CandidateKey, block_importance
from adaprune.specs.llama import LlamaSpec
from adaprune.vocabulary import BlockKind, Level, parse_units
from conftest import random_batches
from families import FAMILIES, Shape, build

SHAPE = Shape(layers=4, kv_heads=4, heads_per_group=2, head_dim=8, width=40)


def global_allocation(graph: UnitTable, scores: dict, budget: Budget) -> list[LayerPlan]:
    """The global allocator on scores given as {level: [...], "attention_block": [tensor([r]), ...], ...}."""
    blocks = {kind: [float(t[0]) if t.numel() else None for t in scores[f"{kind}_block"]]
              for kind in BlockKind if f"{kind}_block" in scores}
    units = {Level(level): per_layer for level, per_layer in scores.items() if not level.endswith("_block")}
    return GlobalAllocator().allocate(graph, AllocationScores(units, blocks), budget)


def block_scores(candidates: dict) -> dict:
    """Block importance from candidates given as {"estimator/granularity": {level: [...]}}, keyed "<kind>_block"."""
    keyed = {CandidateKey(*name.split("/")): {Level(level): t for level, t in by_level.items()}
             for name, by_level in candidates.items()}
    return {f"{kind}_block": values for kind, values in block_importance(keyed).items()}


def synthetic_scores(graph: UnitTable, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {level: [torch.rand(layer.num_units[level], generator=generator, dtype=torch.float64) + 0.1
                    for layer in graph]
            for level in ("kv_group", "head", "channel")}


def budget(graph: UnitTable, ratio: float, units=("kv_groups", "channels"), layers=None, multiple: int = 8) -> Budget:
    return Budget(ratio, parse_units(units), eligible_layers(len(graph), layers), multiple)


def removed_fraction(plans: list[LayerPlan], graph: UnitTable) -> float:
    prunable = sum(int(layer.unit_param_counts("kv_group").sum() + layer.unit_param_counts("channel").sum())
                   for layer in graph)
    removed = 0
    for plan, layer in zip(plans, graph):
        removed += sum(layer.block_params[kind] for kind in plan.removed_blocks())
        removed += int(layer.unit_param_counts("kv_group")[plan.remove_kv_groups].sum())
        removed += int(layer.unit_param_counts("head")[plan.remove_heads].sum())
        removed += int(layer.unit_param_counts("channel")[plan.remove_channels].sum())
    return removed / prunable


@pytest.fixture(scope="module")
def graph():
    return unit_table(build(FAMILIES[0], SHAPE))


def test_global_is_registered():
    assert allocator_classes()["global"] is GlobalAllocator


@pytest.mark.parametrize("units", [("kv_groups", "channels"), ("query_heads", "channels"), ("channels",)])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_budget_met_and_structure_rules_hold(graph, units, ratio):
    plans = global_allocation(graph, synthetic_scores(graph), budget(graph, ratio, units))
    # Near the budget: within the largest single step (a KV group here: 2048 of 16640 parameters).
    assert abs(removed_fraction(plans, graph) - ratio) < 0.07
    for plan, layer in zip(plans, graph):
        shape = plan.pruned_shape(layer.shape)
        assert shape.attention.num_kv_heads >= 1
        assert shape.mlp_width % 8 == 0 and shape.mlp_width >= 8
        per_group = SHAPE.heads_per_group
        left = [sum(h not in plan.remove_heads for h in range(g * per_group, (g + 1) * per_group))
                for g in range(SHAPE.kv_heads)]
        assert len(set(left)) == 1 and left[0] >= 1


def test_rounding_keeps_multiples_of_odd_widths():
    graph = unit_table(build(FAMILIES[0], Shape(layers=3, kv_heads=2, heads_per_group=1, head_dim=8, width=44)))
    plans = global_allocation(graph, synthetic_scores(graph), budget(graph, 0.3, ("channels",), multiple=16))
    widths = [plan.pruned_shape(layer.shape).mlp_width for plan, layer in zip(plans, graph)]
    assert all(width in (16, 32, 44) for width in widths) and min(widths) < 44


def test_per_site_normalisation_ignores_the_scale_of_a_layer(graph):
    scores = synthetic_scores(graph)
    scaled = {level: [t * (1000.0 if i == 2 else 1.0) for i, t in enumerate(per_layer)]
              for level, per_layer in scores.items()}
    assert global_allocation(graph, scores, budget(graph, 0.3)) == global_allocation(graph, scaled, budget(graph, 0.3))


def test_layers_whose_blocks_matter_more_lose_less(graph):
    same = synthetic_scores(graph)
    scores = {level: [per_layer[0].clone() for _ in per_layer] for level, per_layer in same.items()}
    scores["attention_block"] = [torch.tensor([w], dtype=torch.float64) for w in (1.0, 1.0, 1.0, 1.0)]
    scores["mlp_block"] = [torch.tensor([w], dtype=torch.float64) for w in (4.0, 1.0, 1.0, 0.25)]
    plans = global_allocation(graph, scores, budget(graph, 0.15, ("channels",)))
    lost = [len(plan.remove_channels) for plan in plans]
    assert lost[0] < lost[1] == lost[2] < lost[3]
    without = global_allocation(graph, {k: v for k, v in scores.items() if not k.endswith("_block")},
                                budget(graph, 0.15, ("channels",)))
    assert len({len(plan.remove_channels) for plan in without}) == 1  # identical layers, equal weight


def layer_fractions(plans: list[LayerPlan], graph: UnitTable) -> list[float]:
    return [removed_fraction([plan], graph.subset([i])) for i, plan in enumerate(plans)]


@pytest.mark.parametrize("units", [("kv_groups", "channels"), ("kv_groups", "channels", "blocks")])
def test_max_layer_fraction_caps_every_layer_and_still_meets_the_budget(graph, units):
    scores = synthetic_scores(graph)
    scores["attention_block"] = [torch.tensor([w], dtype=torch.float64) for w in (1.0, 1.0, 1.0, 0.05)]
    scores["mlp_block"] = [torch.tensor([w], dtype=torch.float64) for w in (1.0, 1.0, 1.0, 0.05)]
    free = global_allocation(graph, scores, budget(graph, 0.4, units))
    assert max(layer_fractions(free, graph)) > 0.7  # the cheap last layer is gutted without a cap
    blocks = {kind: [float(t[0]) for t in scores[f"{kind}_block"]] for kind in BlockKind}
    fused = {Level(level): scores[level] for level in ("kv_group", "head", "channel")}
    capped = GlobalAllocator(max_layer_fraction=0.5).allocate(graph, AllocationScores(fused, blocks),
                                                              budget(graph, 0.4, units))
    assert max(layer_fractions(capped, graph)) <= 0.5
    assert abs(removed_fraction(capped, graph) - 0.4) < 0.07
    assert GlobalAllocator(max_layer_fraction=None).allocate(graph, AllocationScores(fused, blocks),
                                                             budget(graph, 0.4, units)) == free


def test_max_layer_fraction_is_checked_and_recorded(graph):
    assert create_allocator("global", max_layer_fraction=0.6).options == {"max_layer_fraction": 0.6}
    assert create_allocator("global").options == {}
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigurationError, match="max_layer_fraction"):
            create_allocator("global", max_layer_fraction=bad)
    with pytest.raises(ConfigurationError, match="max_layer_fraction=0.2 lets the eligible layers lose at most"):
        GlobalAllocator(max_layer_fraction=0.2).allocate(
            graph, AllocationScores({Level(k): v for k, v in synthetic_scores(graph).items()}), budget(graph, 0.3))


def test_lowest_units_go_first_across_layers(graph):
    scores = synthetic_scores(graph)
    scores["channel"][3][:16] = 1e-6  # 16 nearly useless channels in layer 3
    plans = global_allocation(graph, scores, budget(graph, 0.05, ("channels",)))
    assert set(range(16)) <= set(plans[3].remove_channels)


def test_eligible_layers_only(graph):
    plans = global_allocation(graph, synthetic_scores(graph), budget(graph, 0.2, layers="1:3"))
    assert plans[0] == LayerPlan(0) and plans[3] == LayerPlan(3)
    assert abs(removed_fraction(plans, graph) - 0.2) < 0.07


def test_budget_beyond_what_units_can_remove(graph):
    with pytest.raises(ConfigurationError, match="at most .* Lower the ratio"):
        global_allocation(graph, synthetic_scores(graph), budget(graph, 0.9))


def test_cheap_block_goes_whole_and_the_floor_does_not_apply_to_it(graph):
    scores = synthetic_scores(graph)
    scores["attention_block"] = [torch.tensor([r], dtype=torch.float64) for r in (1.5, 0.05, 1.2, 1.25)]
    scores["mlp_block"] = [torch.tensor([1.0], dtype=torch.float64) for _ in range(4)]
    plans = global_allocation(graph, scores, budget(graph, 0.15, ("kv_groups", "channels", "blocks")))
    assert plans[1].remove_attention and plans[1].remove_kv_groups == []
    assert not any(p.remove_mlp for p in plans)
    assert abs(removed_fraction(plans, graph) - 0.15) < 0.07


def test_block_scores_compare_layers_from_raw_candidates():
    candidates = {"m/coarse": {"kv_group": [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])],
                               "channel": [torch.ones(4), torch.ones(4)]}}
    scores = block_scores(candidates)
    assert [float(t) for t in scores["attention_block"]] == [0.5, 1.5]
    assert [float(t) for t in scores["mlp_block"]] == [1.0, 1.0]


def test_block_units_need_global_allocation_and_a_family_that_supports_them(tiny_gqa):
    with pytest.raises(ConfigurationError, match="allocation='global'"):
        Pruner(tiny_gqa, units=["kv_groups", "blocks"], allocation="uniform")

    class NoBlocks(LlamaSpec):
        mlp_block = None

    with pytest.raises(ConfigurationError, match="cannot run without its mlp block.*drop"):
        check_units(parse_units(("mlp_blocks",)), create_allocator("global"), NoBlocks())


def prune_blocks(model, ids):
    """Plan with global allocation and whole blocks (layer 1 loses attention, layer 2 its MLP)."""
    pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], fusion="fixed", allocation="global",
                    units=["kv_groups", "channels", "blocks"], progress=False)
    plan = pruner.plan()
    plan.layers[1].remove_attention = True
    plan.layers[2].remove_mlp = True
    plan.layers[0].remove_kv_groups = [1]
    with torch.no_grad():
        pruner.apply(plan, mode="mask")
        masked = model(input_ids=ids).logits
        pruner.restore()
        pruner.apply(plan, mode="slice")
    return plan, masked


def test_model_without_blocks_runs_generates_and_reloads(tmp_path):
    shape = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=16)
    model = build(FAMILIES[1], shape)  # with biases: a block holds parameters no unit owns
    fresh = build(FAMILIES[1], shape)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    plan, masked = prune_blocks(model, ids)
    with torch.no_grad():
        sliced = model(input_ids=ids).logits
        torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-5)
        # The KV cache keeps its length through a layer without attention: incremental == full.
        first = model(input_ids=ids[:, :5], use_cache=True)
        rest = model(input_ids=ids[:, 5:], cache=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), sliced, rtol=1e-4, atol=1e-4)
    layers = fresh.model.layers
    whole = sum(p.numel() for block in (layers[1].self_attn, layers[2].mlp) for p in block.parameters())
    group = int(unit_table(fresh).layers[0].unit_param_counts("kv_group")[1])
    assert unit_table(fresh).count_removed(plan.layers) == whole + group
    assert sum(p.numel() for p in model.parameters()) == plan.params["total_before"] - whole - group
    assert [s.removed_blocks() for s in unit_table(model).shapes] == [(), ("attention",), ("mlp",)]

    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [config["per_layer_config"].get(str(i), {}).get("skip") for i in range(3)] == [None, ["attention"], ["mlp"]]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, sliced, rtol=0, atol=1e-5)
        generated = reloaded.generate(ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        greedy = ids[:1, :4]
        for _ in range(5):
            greedy = torch.cat([greedy, reloaded(input_ids=greedy).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, greedy)


def test_global_plan_with_blocks_end_to_end(tiny_gqa):
    pruner = Pruner(tiny_gqa, ratio=0.3, estimators=["taylor"], fusion="fixed", allocation="global",
                    units=["kv_groups", "channels", "blocks"], progress=False)
    plan = pruner.plan(random_batches(97))
    assert "attention" in plan.block_scores and "mlp" in plan.block_scores  # plan version 3: a field of its own
    assert abs(plan.params["prunable_fraction_removed"] - 0.3) < 0.1
    before = sum(p.numel() for p in tiny_gqa.parameters())
    pruner.apply(plan)
    assert sum(p.numel() for p in tiny_gqa.parameters()) == before - plan.params["removed"]
    with torch.no_grad():
        tiny_gqa(input_ids=torch.tensor([[1, 2, 3]]))


def test_allocation_options_reach_the_allocator_and_the_plan(tiny_gqa):
    pruner = Pruner(tiny_gqa, ratio=0.3, estimators=["taylor"], fusion="fixed", allocation="global",
                    allocation_options={"max_layer_fraction": 0.45}, reconstruct=False, progress=False)
    plan = pruner.plan(random_batches(97))
    assert plan.settings["allocation_options"] == {"max_layer_fraction": 0.45}
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).settings == plan.settings
    graph = unit_table(tiny_gqa)
    assert max(layer_fractions(plan.layers, graph)) <= 0.45
    with pytest.raises(ConfigurationError, match="refused its options"):
        Pruner(tiny_gqa, allocation="uniform", allocation_options={"max_layer_fraction": 0.5})


def test_plan_versions_and_block_validation(tiny_gqa):
    pruner = Pruner(tiny_gqa, estimators=["magnitude"], fusion="fixed", progress=False)
    data = pruner.plan().to_dict()
    assert data["version"] == 3
    old = json.loads(json.dumps(data))
    old["version"] = 1
    for layer in old["layers"]:
        del layer["remove_attention"], layer["remove_mlp"]
    upgraded = Plan.from_dict(old)
    assert upgraded.version == 3 and not any(layer.removed_blocks() for layer in upgraded.layers)

    corrupt = json.loads(json.dumps(data))
    corrupt["layers"][0]["remove_mlp"] = "yes"
    with pytest.raises(PlanError, match="corrupt"):
        Plan.from_dict(corrupt)

    both = Plan.from_dict(data)
    both.layers[0].remove_attention, both.layers[0].remove_kv_groups = True, [0]
    with pytest.raises(PlanError, match="whole attention block and also lists units"):
        pruner.apply(both)


def test_plan_removing_a_block_the_family_cannot_lose_is_refused(tiny_gqa, monkeypatch):
    pruner = Pruner(tiny_gqa, ratio=0.0, estimators=["magnitude"], fusion="fixed", progress=False)
    plan = pruner.plan()
    plan.layers[0].remove_mlp = True
    monkeypatch.setattr(LlamaSpec, "mlp_block", None)
    with pytest.raises(PlanError, match="cannot run without it"):
        pruner.apply(plan)


def test_round_kept_always_gives_one_of_the_kept_widths_and_keeps_a_whole_layer_whole():
    from adaprune.allocation.budget import channel_chunks, kept_widths, round_kept

    for width, multiple in [(11, 8), (1536, 8), (44, 16), (40, 8), (5, 1), (16, 16)]:
        widths = kept_widths(width, multiple)
        assert all(round_kept(k / 4, width, multiple) in widths for k in range(0, 4 * width + 1))
        assert round_kept(width, width, multiple) == width  # nothing asked, nothing removed
        assert sum(channel_chunks(width, multiple)) == width - widths[-1]
