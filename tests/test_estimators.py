"""The built-in estimators compute what their docstrings say, in one calibration pass, and touch nothing."""

from __future__ import annotations

import pytest
import torch

from adaprune import ConfigurationError, Plan, PlanError, Pruner, unit_table
from adaprune.scoring.calibration import ActivationStats
from adaprune.plugins import create_estimator, list_estimators
from adaprune.estimators.taylor import REDUCTIONS
from conftest import random_batches
from families import FAMILIES, Shape, build

SHAPE = Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=4, width=16)


class ForwardCounter:
    """Counts the model's forward passes (a forward hook on the top module)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, *_):
        self.count += 1


def snapshot(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_unchanged(model, before):
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def inputs_of(model, batches, path):
    """Every token's input to module `path` over the batches, as a float64 [tokens, features] matrix."""
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).to(torch.float64)


def test_builtins_are_registered():
    assert {"magnitude", "taylor", "activation", "fluctuation", "learned"} <= set(list_estimators())


def test_welford_is_stable_for_a_large_mean_and_a_small_variance():
    generator = torch.Generator().manual_seed(0)
    chunks = [1e8 + 1e-2 * torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in (1, 7, 300, 2, 64)]
    stats = ActivationStats(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    for chunk in chunks:
        stats.update(chunk.unsqueeze(0))  # [batch, tokens, features], as a Linear sees it
    everything = torch.cat(chunks)
    torch.testing.assert_close(stats.mean, everything.mean(0), rtol=1e-15, atol=0)
    torch.testing.assert_close(stats.variance, everything.var(0), rtol=1e-6, atol=0)
    # The textbook one-pass formula loses every digit here: this is the case Welford is for.
    naive = (everything**2).sum(0) - everything.shape[0] * everything.mean(0) ** 2
    assert not torch.allclose(naive / (everything.shape[0] - 1), everything.var(0), rtol=1e-2)


def test_three_estimators_cost_one_pass():
    model = build(FAMILIES[0], SHAPE)
    batches = random_batches(SHAPE.vocab, count=3)
    counter = ForwardCounter(model)
    estimators = ["magnitude", "taylor", "activation", "fluctuation"]
    cache = Pruner(model, estimators=estimators, progress=False).score(batches)
    assert counter.count == len(batches)
    assert set(cache) == set(estimators)


@pytest.fixture
def scored():
    """A tiny Llama, its calibration batches, and the activation and fluctuation scores from them."""
    model = build(FAMILIES[0], SHAPE)
    batches = random_batches(SHAPE.vocab)
    return model, batches, Pruner(model, estimators=["activation", "fluctuation"], progress=False).score(batches)


def test_activation_is_weight_times_input_norm(scored):
    model, batches, cache = scored
    mlp = model.model.layers[1].mlp
    gate_norm = inputs_of(model, batches, "model.layers.1.mlp.gate_proj").norm(dim=0)
    down_norm = inputs_of(model, batches, "model.layers.1.mlp.down_proj").norm(dim=0)
    expected = sum(w.detach().abs().double() @ gate_norm for w in (mlp.gate_proj.weight, mlp.up_proj.weight))
    expected = expected + mlp.down_proj.weight.detach().abs().double().sum(0) * down_norm
    torch.testing.assert_close(cache["activation"]["fine"]["channel"][1], expected)


def test_fluctuation_is_input_variance_times_squared_column_norm(scored):
    model, batches, cache = scored
    scores = cache["fluctuation"]["coarse"]
    variance = inputs_of(model, batches, "model.layers.0.self_attn.o_proj").var(dim=0)
    per_column = variance * (model.model.layers[0].self_attn.o_proj.weight.detach().double() ** 2).sum(0)
    torch.testing.assert_close(scores["head"][0], per_column.view(SHAPE.heads, SHAPE.head_dim).sum(1))
    torch.testing.assert_close(scores["kv_group"][0], per_column.view(SHAPE.kv_heads, -1).sum(1))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_taylor_group_reduction_matches_a_full_gradient(reduction):
    model = build(FAMILIES[1], SHAPE)  # with biases: they join their projection's partial score
    ids = random_batches(SHAPE.vocab, count=1)[0]
    scores = Pruner(model, estimators=[{"name": "taylor", "reduction": reduction}], progress=False).score([ids])
    coarse = scores["taylor"]["coarse"]["channel"][0]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    mlp = model.model.layers[0].mlp

    def wg(param):
        return (param.detach() * param.grad).double()

    rows = {name: wg(getattr(mlp, name).weight).sum(1) for name in ("gate_proj", "up_proj")}
    partials = [(rows[name].abs() + wg(getattr(mlp, name).bias).abs()) for name in rows]
    partials.append(wg(mlp.down_proj.weight).sum(0).abs())  # the down projection's bias is no channel's
    stacked = torch.stack(partials)
    whole = (sum(wg(getattr(mlp, name).weight).sum(1) + wg(getattr(mlp, name).bias) for name in rows)
             + wg(mlp.down_proj.weight).sum(0)).abs()
    expected = {"whole": whole, "sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.max(0).values,
                "prod": stacked.prod(0)}[reduction]
    torch.testing.assert_close(coarse, expected, rtol=1e-4, atol=1e-12)
    model.zero_grad(set_to_none=True)


def test_learned_gates_are_seeded_and_leave_the_model_as_it_was():
    model = build(FAMILIES[0], SHAPE)
    model.train()
    batches = random_batches(SHAPE.vocab)
    before = snapshot(model)
    requires = [p.requires_grad for p in model.parameters()]
    counter = ForwardCounter(model)
    runs = [Pruner(model, estimators=[{"name": "learned", "steps": 3, "seed": 1}], progress=False).score(batches)
            for _ in range(2)]
    assert counter.count == 2 * 3 * 2  # per step: a dense reference and a gated pass
    for level, per_layer in runs[0]["learned"]["coarse"].items():
        for first, second in zip(per_layer, runs[1]["learned"]["coarse"][level]):
            assert torch.equal(first, second)
            assert bool(((first >= 0) & (first <= 1)).all())
    assert_unchanged(model, before)
    assert [p.requires_grad for p in model.parameters()] == requires
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert len(model._forward_hooks) == 1  # the counter's only


def test_estimator_options_are_checked():
    for name, options in (("taylor", {"reduction": "median"}), ("learned", {"steps": 0}),
                          ("fluctuation", {"compensate": "yes"}), ("activation", {"norm": 1})):
        with pytest.raises(Exception, match=name):
            create_estimator(name, **options)


# ---- bias compensation ------------------------------------------------------------------------
COMPENSATED = [{"name": "fluctuation", "compensate": True}]


def output_mean(model, batches, path):
    """Mean output of module `path` over the calibration tokens."""
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    handle.remove()
    return torch.cat([y.reshape(-1, y.shape[-1]) for y in seen]).mean(0)


def test_compensation_keeps_the_mean_output_and_masked_equals_sliced(tmp_path):
    model = build(FAMILIES[1], SHAPE)  # o_proj and down_proj have biases
    batches = random_batches(SHAPE.vocab)
    ids = batches[0]
    first = "model.layers.0.self_attn.o_proj"  # its input is untouched by the plan upstream of it
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    dense_mean = output_mean(model, batches, first)
    # Without reconstruction: its bias refit would keep the mean on its own (see test_reconstruct.py).
    pruner = Pruner(model, ratio=0.4, estimators=COMPENSATED, fusion="fixed", allocation="uniform", reconstruct=False,
                    progress=False)
    plan = pruner.plan(batches)
    assert {entry["projection"] for entry in plan.compensation} >= {first}
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").to_dict() == plan.to_dict()

    pruner.apply(plan, mode="mask")
    torch.testing.assert_close(output_mean(model, batches, first), dense_mean, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    pruner.restore()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense_logits, rtol=0, atol=0)
    uncompensated = Pruner(model, ratio=0.4, estimators=["fluctuation"], fusion="fixed", allocation="uniform",
                           reconstruct=False,
                           progress=False)
    uncompensated.apply(uncompensated.plan(batches), mode="mask")
    assert not torch.allclose(output_mean(model, batches, first), dense_mean, rtol=1e-4, atol=1e-4)
    uncompensated.restore()

    pruner.apply(plan, mode="slice")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=0, atol=1e-5)


def test_compensation_without_a_bias_is_refused_before_any_work():
    model = build(FAMILIES[0], SHAPE)  # Llama: no bias on o_proj / down_proj
    before = snapshot(model)
    counter = ForwardCounter(model)
    with pytest.raises(ConfigurationError, match="no bias"):
        Pruner(model, ratio=0.3, estimators=COMPENSATED, progress=False).plan(random_batches(SHAPE.vocab))
    assert counter.count == 0
    assert_unchanged(model, before)


def test_a_compensated_plan_on_a_model_without_bias_is_refused_unchanged():
    biased = build(FAMILIES[1], SHAPE)
    pruner = Pruner(biased, ratio=0.3, estimators=COMPENSATED, fusion="fixed", progress=False)
    plan = pruner.plan(random_batches(SHAPE.vocab))
    plain = build(FAMILIES[0], SHAPE)  # same class, same shapes, no biases
    before = snapshot(plain)
    for mode in ("mask", "slice"):
        with pytest.raises(PlanError, match="has none"):
            Pruner(plain, progress=False).apply(plan, mode=mode)
        assert_unchanged(plain, before)
    assert [s.to_dict() for s in unit_table(plain).shapes] == [s.to_dict() for s in plan.shapes]
