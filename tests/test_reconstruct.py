"""Weight reconstruction after removal: closer to the dense model, the same logits masked or sliced, never NaN."""

from __future__ import annotations

import pytest
import torch

from adaprune import ConfigurationError, Pruner
from adaprune.stages.reconstruct import ReconstructStage
from conftest import random_batches
from families import FAMILIES, Shape, build

SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=32)


def family(name):
    return next(f for f in FAMILIES if f.name == name)


def output_error(model, dense_logits, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - dense_logits).pow(2).mean())


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_reconstruction_brings_the_model_closer_to_dense_and_mask_equals_slice(name):
    """On held-out tokens, with the dense model's layer inputs as the target (random weights have
    nearly uncorrelated features: the kept ones cannot stand in for the removed ones, but the
    refit still corrects the error that accumulates upstream)."""
    batches = random_batches(97, count=4, batch=4, seq=16)
    held_out = random_batches(97, count=1, batch=4, seq=16, seed=7)[0]
    errors, logits = {}, {}
    for reconstruct in (False, {"target": "dense"}):
        model = build(family(name), SHAPE)
        with torch.no_grad():
            dense = model(input_ids=held_out).logits
        pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", reconstruct=reconstruct,
                        mode="mask", progress=False)
        plan = pruner.plan(batches)
        pruner.apply(plan)
        errors[bool(reconstruct)] = output_error(model, dense, held_out)
        with torch.no_grad():
            logits[bool(reconstruct)] = model(input_ids=held_out).logits
        if reconstruct:
            reconstruct = True
            report = plan.stages["reconstruct"]
            assert report["rows"] == 16 and report["layers"], report
            pruner.restore()  # undoes the refit too
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=held_out).logits, dense, rtol=0, atol=0)
            sliced = build(family(name), SHAPE)
            slicer = Pruner(sliced, ratio=0.3, estimators=["activation"], fusion="fine", progress=False,
                            reconstruct={"target": "dense"})
            slicer.apply(plan, calibration=batches)
            with torch.no_grad():
                torch.testing.assert_close(sliced(input_ids=held_out).logits, logits[True], rtol=1e-4, atol=1e-4)
            assert sum(p.numel() for p in sliced.parameters()) == plan.params["total_after"]
    assert errors[True] < errors[False], errors


def test_dense_target_and_options_are_recorded():
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", progress=False,
                    reconstruct={"target": "dense", "damping": 0.1, "samples": 6})
    plan = pruner.plan(random_batches(97, count=2, batch=4, seq=16))
    pruner.apply(plan)
    defaults = ReconstructStage().options
    assert plan.settings["stages"]["reconstruct"] == {"damping": 0.1, "samples": 6, "target": "dense", "bias": True,
                                                      "add_bias": False, "anchor": "dense",
                                                      "epochs": defaults["epochs"], "lr": defaults["lr"]}
    assert plan.stages["reconstruct"]["rows"] == 6
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_a_singular_system_gets_more_damping_never_nan(monkeypatch):
    model = build(FAMILIES[0], SHAPE)
    # One repeated token: every input row is the same, the Gram matrices are rank one; and the first
    # factorisation of each system is made to fail, as a numerically singular one does.
    batches = [torch.full((2, 8), 5, dtype=torch.long)]
    factorise, failed = torch.linalg.cholesky_ex, set()

    def failing_once(matrix):
        factor, info = factorise(matrix)
        if matrix.shape not in failed:
            failed.add(matrix.shape)
            return factor, torch.ones_like(info)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_once)
    pruner = Pruner(model, ratio=0.3, estimators=["magnitude"], fusion="fine", progress=False,
                    reconstruct={"damping": 1e-12})
    plan = pruner.plan(batches)
    pruner.apply(plan)
    report = plan.stages["reconstruct"]
    assert report["warnings"] and "damping" in report["warnings"][0]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_without_calibration_it_is_skipped_and_says_so():
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=["magnitude"], fusion="fine", progress=False)
    plan = pruner.plan()
    pruner.apply(plan)
    assert "skipped" in plan.stages["reconstruct"]


@pytest.mark.parametrize("options, match", [({"damping": 0}, "damping"), ({"target": "x"}, "target"),
                                            ({"samples": 0}, "samples"), ({"nope": 1}, "not understood"),
                                            ({"anchor": "x"}, "anchor"), ({"epochs": -1}, "epochs"),
                                            ({"epochs": 1.5}, "epochs"), ({"lr": 0}, "lr"),
                                            ({"lr": float("nan")}, "lr"), ({"lr": "fast"}, "lr")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigurationError, match=match):
        Pruner(build(FAMILIES[0], SHAPE), reconstruct=options)
    assert ReconstructStage().options["target"] == "pruned"


def test_the_bias_refit_keeps_the_mean_output_as_flaps_compensation_does():
    """Layer 0's output projection sees the dense inputs; with a bias, the refit keeps its mean output exactly."""
    from test_estimators import output_mean

    model = build(family("llama-untied-biased"), SHAPE)
    batches = random_batches(97, count=2, batch=4, seq=16)
    first = "model.layers.0.self_attn.o_proj"
    dense_mean = output_mean(model, batches, first)
    pruner = Pruner(model, ratio=0.4, estimators=["fluctuation"], fusion="fixed", mode="mask", progress=False,
                    reconstruct={"epochs": 0})  # the refit alone: the training after it aims at the whole layer
    pruner.apply(pruner.plan(batches))
    torch.testing.assert_close(output_mean(model, batches, first), dense_mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_biases_switched_on_for_a_llama_are_fitted_counted_and_reload(tmp_path, allocation):
    from transformers import AutoModelForCausalLM

    model = build(FAMILIES[0], SHAPE)  # Llama: no biases, but attention_bias / mlp_bias can switch them on
    batches = random_batches(97, count=2, batch=4, seq=16)
    pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", progress=False, units=["channels"],
                    allocation=allocation, reconstruct={"add_bias": True})
    plan = pruner.plan(batches)
    pruner.apply(plan)
    assert model.config.mlp_bias and not model.config.attention_bias  # only the refitted block's switch
    assert plan.stages["reconstruct"]["parameters_added"] > 0
    assert sum(p.numel() for p in model.parameters()) == plan.params["total_after"]
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0  # fitted, not left at zero
    model.save_pretrained(tmp_path)
    # Per-layer shapes (global) reload through the generated modeling file; uniform with the stock classes.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=allocation == "global").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_switched_on_biases_go_again_on_restore():
    model = build(FAMILIES[0], SHAPE)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", progress=False, mode="mask",
                    reconstruct={"add_bias": True})
    pruner.apply(pruner.plan(random_batches(97, count=2, batch=4, seq=16)))
    pruner.restore()
    assert not model.config.attention_bias and model.model.layers[0].self_attn.q_proj.bias is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)


def _refitted_weights(options) -> dict[str, torch.Tensor]:
    """The refit alone (no training after it), with `options`."""
    options = {**options, "epochs": 0} if options else options
    model = build(family("llama"), SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", reconstruct=options, progress=False)
    pruner.apply(pruner.plan(random_batches(97, count=4, batch=4, seq=16)))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))}


def test_the_dense_anchor_moves_from_the_full_refit_to_the_dense_weights():
    """Anchored at the dense weights, a tiny damping refits as the plain ridge does, and a huge one
    leaves the kept weights as they were (what slicing without reconstruction keeps)."""
    plain = _refitted_weights({"damping": 1e-6, "anchor": "zero"})
    light = _refitted_weights({"damping": 1e-6, "anchor": "dense"})
    heavy = _refitted_weights({"damping": 1e6, "anchor": "dense"})
    untouched = _refitted_weights(False)
    for name in plain:
        torch.testing.assert_close(light[name], plain[name], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(heavy[name], untouched[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(plain[n], untouched[n], atol=1e-3) for n in plain)  # the refit did change some


def test_empty_options_mean_the_defaults_not_off():
    model = build(family("llama"), SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", reconstruct={}, progress=False)
    plan = pruner.plan(random_batches(97, count=4, batch=4, seq=16))
    pruner.apply(plan)
    assert plan.stages["reconstruct"]["layers"] and plan.stages["reconstruct"]["anchor"] == "dense"


TRAINING = {"epochs": 8, "lr": 1e-2}  # tiny random layers: a few steps at a large rate fit them


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_layer_training_brings_the_model_closer_than_the_refit_alone_and_mask_equals_slice(name):
    """The same plan refitted, then trained: closer to dense on held-out tokens; masked and sliced
    give the same logits (so the removed entries stayed zero through the training); restore() undoes it."""
    batches = random_batches(97, count=4, batch=4, seq=16)
    held_out = random_batches(97, count=1, batch=4, seq=16, seed=7)[0]
    errors, plan = {}, None
    for trained in (False, True):
        model = build(family(name), SHAPE)
        with torch.no_grad():
            dense = model(input_ids=held_out).logits
        pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", mode="mask", progress=False,
                        reconstruct={**TRAINING, "epochs": TRAINING["epochs"] if trained else 0})
        plan = plan or pruner.plan(batches)
        pruner.apply(plan, calibration=batches)
        errors[trained] = output_error(model, dense, held_out)
    assert errors[True] < errors[False], errors
    training = [layer["training"] for layer in plan.stages["reconstruct"]["layers"]]
    assert len(training) == SHAPE.layers and any(t["loss_after"] < t["loss_before"] for t in training), training
    assert all(t["loss_after"] < t["loss_before"] or t["kept"] == "refit" for t in training), training
    with torch.no_grad():
        masked = model(input_ids=held_out).logits
    pruner.restore()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=held_out).logits, dense, rtol=0, atol=0)
    sliced = build(family(name), SHAPE)
    Pruner(sliced, ratio=0.3, estimators=["activation"], fusion="fine", reconstruct=TRAINING,
           progress=False).apply(plan, calibration=batches)
    with torch.no_grad():
        torch.testing.assert_close(sliced(input_ids=held_out).logits, masked, rtol=1e-4, atol=1e-4)


def test_training_that_fits_worse_leaves_the_refit_as_it_was():
    """A learning rate far too large makes the layer worse: the refit's weights are kept, and the report says so."""
    batches = random_batches(97, count=2, batch=4, seq=16)
    weights = {}
    for options in ({"epochs": 0}, {"epochs": 2, "lr": 0.9}):
        model = build(family("llama"), SHAPE)
        pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", reconstruct=options,
                        progress=False)
        plan = pruner.plan(batches)
        pruner.apply(plan)
        weights[options["epochs"]] = [p.detach().clone() for p in model.parameters()]
    assert all(layer["training"]["kept"] == "refit" for layer in plan.stages["reconstruct"]["layers"])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[2]))


def test_a_half_precision_model_trains_in_float32_and_stays_in_its_dtype():
    model = build(family("llama"), SHAPE).to(torch.bfloat16)
    pruner = Pruner(model, ratio=0.3, estimators=["activation"], fusion="fine", reconstruct=TRAINING, progress=False)
    plan = pruner.plan(random_batches(97, count=2, batch=4, seq=16))
    pruner.apply(plan)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any("loss_after" in layer["training"] and "kept" not in layer["training"]
               for layer in plan.stages["reconstruct"]["layers"])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("ratio, epochs", [(0.1, 0), (0.2, 8), (0.5, 8)])
def test_auto_epochs_train_only_from_a_ratio_of_a_fifth(ratio, epochs):
    model = build(family("llama"), SHAPE)
    pruner = Pruner(model, ratio=ratio, estimators=["activation"], fusion="fine", progress=False)
    plan = pruner.plan(random_batches(97, count=2, batch=4, seq=16))
    pruner.apply(plan)
    report = plan.stages["reconstruct"]
    assert plan.settings["stages"]["reconstruct"]["epochs"] == "auto" and report["epochs_trained"] == epochs
    assert any("training" in layer for layer in report["layers"]) == (epochs > 0)
