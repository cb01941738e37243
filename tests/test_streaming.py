"""Offload: a model pruned one decoder layer at a time from its safetensors files equals the in-memory prune.

Same plan (units and scores, bit for bit), same logits after reload, for every family; never more
than one decoder layer's weights in memory; what cannot stream is refused with the alternative.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaprune import Pruner, Stage
from adaprune.errors import ConfigurationError
from adaprune.streaming import CheckpointWeights, empty_model
from adaprune.tools.cli import main as cli_main

from families import FAMILIES, Shape, build
from test_cli_eval_report import word_tokenizer

SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=48)
# The defaults (Taylor and activation, adaptive fusion, global allocation, reconstruction); the
# fixed fusion where a test is about the other stages.
DEFAULT = dict(progress=False)
STREAMABLE = dict(fusion="fixed", progress=False)


def _batches(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE.vocab, (2, 16), generator=g) for _ in range(3)]


def _checkpoint(family, tmp_path):
    model = build(family, SHAPE)
    model.save_pretrained(tmp_path / "dense", max_shard_size="20KB")  # several shards: the index is read
    return model, tmp_path / "dense"


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("allocation,units", [("global", ("kv_groups", "channels")),
                                              ("uniform", ("kv_groups", "channels"))])
def test_streamed_prune_equals_in_memory(family, allocation, units, tmp_path):
    model, dense = _checkpoint(family, tmp_path)
    options = dict(DEFAULT, ratio=0.3, allocation=allocation, units=units)
    in_memory = Pruner(model, **options)
    expected = in_memory.plan(_batches())
    in_memory.save(expected, tmp_path / "in-memory")

    meta = empty_model(dense, trust_remote_code=family.trust_remote_code)
    assert all(p.is_meta for p in meta.parameters())
    streamed = Pruner(meta, offload=dense, **options)
    plan = streamed.plan(_batches())
    assert plan.layers == expected.layers
    assert plan.scores == expected.scores and plan.block_scores == expected.block_scores
    assert plan.params == expected.params
    assert plan.fusion == expected.fusion  # the adaptive fusion trained the same, step by step
    assert plan.fusion["training"]["steps"] > 0
    streamed.save(plan, tmp_path / "streamed")
    assert plan.stages["reconstruct"]["layers"] == expected.stages["reconstruct"]["layers"]  # the same refits
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SHAPE.layers + 1  # one shard per layer, one for the rest
    ids = _batches(seed=7)[0]
    assert torch.equal(_logits(tmp_path / "streamed", ids), _logits(tmp_path / "in-memory", ids))
    assert streamed.report(plan)["params_after"] == in_memory.report(expected)["params_after"]


@pytest.mark.parametrize("estimators", [("magnitude",), ("activation", "fluctuation"),
                                        ({"name": "taylor", "order": 2, "reduction": "max"}, "fluctuation")],
                         ids=["weights-only", "forward-only", "fisher-rows"])
def test_streamed_scores_equal_in_memory_for_every_estimator_kind(estimators, tmp_path):
    family = next(f for f in FAMILIES if f.name == "llama")
    model, dense = _checkpoint(family, tmp_path)
    options = dict(STREAMABLE, estimators=estimators)
    expected = Pruner(model, **options).score(_batches())
    streamed = Pruner(empty_model(dense), offload=dense, **options)
    scores = streamed.score(_batches())
    for name, by_granularity in expected.scores.items():
        for granularity, by_level in by_granularity.items():
            for level, per_layer in by_level.items():
                for a, b in zip(per_layer, scores.scores[name][granularity][level], strict=True):
                    assert torch.equal(a, b), (name, granularity, level)


def test_streamed_blocks_and_compensation_equal_in_memory(tmp_path):
    """Whole blocks removed (global allocation) and FLAP's bias compensation, on a Llama with biases."""
    family = next(f for f in FAMILIES if f.name == "llama-untied-biased")
    model, dense = _checkpoint(family, tmp_path)
    options = dict(STREAMABLE, estimators=({"name": "fluctuation", "compensate": True}, "magnitude"), ratio=0.5,
                   allocation="global", units=("channels", "blocks"))
    in_memory = Pruner(model, **options)
    expected = in_memory.plan(_batches())
    assert expected.compensation and any(p.removed_blocks() for p in expected.layers)
    in_memory.save(expected, tmp_path / "in-memory")
    streamed = Pruner(empty_model(dense), offload=dense, **options)
    plan = streamed.plan(_batches())
    assert plan.layers == expected.layers and plan.compensation == expected.compensation
    streamed.save(plan, tmp_path / "streamed")
    ids = _batches(seed=7)[0]
    assert torch.equal(_logits(tmp_path / "streamed", ids), _logits(tmp_path / "in-memory", ids))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llama", "bloom")], ids=lambda f: f.name)
def test_streamed_layer_training_equals_in_memory(family, tmp_path):
    """The refit's layer-wise training (one layer and its rows resident) gives what it gives in memory."""
    model, dense = _checkpoint(family, tmp_path)
    options = dict(STREAMABLE, ratio=0.3, reconstruct={"epochs": 3, "lr": 1e-2})
    in_memory = Pruner(model, **options)
    expected = in_memory.plan(_batches())
    in_memory.save(expected, tmp_path / "in-memory")
    streamed = Pruner(empty_model(dense, trust_remote_code=family.trust_remote_code), offload=dense, **options)
    plan = streamed.plan(_batches())
    streamed.save(plan, tmp_path / "streamed")
    trained = [layer["training"] for layer in plan.stages["reconstruct"]["layers"]]
    assert len(trained) == SHAPE.layers
    for got, want in zip(trained, (layer["training"] for layer in expected.stages["reconstruct"]["layers"])):
        assert got.keys() == want.keys() and got.get("kept") == want.get("kept")
        assert got["loss_after"] == pytest.approx(want["loss_after"], rel=1e-4)
    ids = _batches(seed=7)[0]
    torch.testing.assert_close(_logits(tmp_path / "streamed", ids), _logits(tmp_path / "in-memory", ids),
                               rtol=1e-4, atol=1e-4)


def _empty_llama(tmp_path):
    """A Llama checkpoint on disk, and the same model with every weight on the meta device."""
    _, dense = _checkpoint(next(f for f in FAMILIES if f.name == "llama"), tmp_path)
    return dense, empty_model(dense)


def _resident(layers) -> int:
    """How many decoder layers hold real weights now."""
    return sum(any(not p.is_meta for p in layer.parameters()) for layer in layers)


def test_one_decoder_layer_resident_at_a_time(tmp_path, monkeypatch):
    dense, meta = _empty_llama(tmp_path)
    layers = meta.model.layers
    most = []
    original = CheckpointWeights.load

    def counting(self, model, prefix):
        original(self, model, prefix)
        most.append(_resident(layers))

    monkeypatch.setattr(CheckpointWeights, "load", counting)
    pruner = Pruner(meta, offload=dense, ratio=0.3, **STREAMABLE)
    plan = pruner.plan(_batches())
    pruner.save(plan, tmp_path / "out")
    # Each layer is loaded three times: forward sweep, backward sweep (Taylor), reconstruction and slicing.
    assert len(most) == 3 * SHAPE.layers and max(most) == 1
    assert all(p.is_meta for p in meta.parameters())  # nothing left resident afterwards


def test_adaptive_fusion_holds_one_decoder_layer_at_a_time(tmp_path, monkeypatch):
    """The fusion trains through the model with its layers on disk: forward, and backward (each layer
    run again), never more than one layer's weights loaded; afterwards the model is as it was."""
    from accelerate.hooks import AlignDevicesHook

    dense, meta = _empty_llama(tmp_path)
    layers = meta.model.layers
    resident, backward = [], []
    original = AlignDevicesHook.pre_forward

    def counting(self, module, *args, **kwargs):
        result = original(self, module, *args, **kwargs)
        resident.append(_resident(layers))
        backward.append(torch._C._current_graph_task_id() != -1)  # a rerun inside the backward pass
        return result

    monkeypatch.setattr(AlignDevicesHook, "pre_forward", counting)
    pruner = Pruner(meta, offload=dense, ratio=0.3, **DEFAULT)
    plan = pruner.plan(_batches())
    assert plan.fusion["training"]["steps"] > 0
    assert resident and max(resident) == 1 and any(backward)
    assert all(p.is_meta for p in meta.parameters())
    assert not any(hasattr(m, "_hf_hook") or "forward" in vars(m) for m in meta.modules())


def test_forward_sweep_holds_one_layer_and_nothing_outside_the_layers(tmp_path, monkeypatch):
    """Forward-only scoring: while a layer runs, no other layer and none of the weights outside the
    layers (embeddings, head) are resident; they are loaded only to enter the first layer and for the head."""
    import adaprune.streaming.scoring as scoring

    dense, meta = _empty_llama(tmp_path)
    layers = meta.model.layers
    seen = []
    original = scoring.forward_layer

    def counting(layer, hidden, arguments):
        outside = [n for n, p in meta.named_parameters() if not n.startswith("model.layers.") and not p.is_meta]
        seen.append((_resident(layers), outside))
        return original(layer, hidden, arguments)

    monkeypatch.setattr(scoring, "forward_layer", counting)
    batches = _batches()
    Pruner(meta, offload=dense, estimators=("activation",), fusion="fixed", progress=False).score(batches)
    assert len(seen) == SHAPE.layers * len(batches)
    assert all(count == 1 and not outside for count, outside in seen)
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("shape", [(2, 16, 48), (4, 128, 300), (3, 37, 1031), (1, 2, 129), (5, 7, 64), (2, 33, 4097)])
def test_activation_moments_in_column_blocks_equal_the_whole_matrix(shape, monkeypatch):
    """The CPU moments are taken a block of columns at a time; they equal, bit for bit, the moments of
    the whole activation upcast at once (the formula before blocks), whatever the block width."""
    from adaprune.scoring import calibration

    def whole(x):
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        mean = x.mean(0)
        return x.shape[0], mean, ((x - mean) ** 2).sum(0)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + torch.arange(shape[-1]) / shape[-1]
    original = x.clone()
    expected = whole(x)
    for elements in (1, 1 << 10, 1 << 14, calibration.MOMENT_CHUNK_ELEMENTS):
        monkeypatch.setattr(calibration, "MOMENT_CHUNK_ELEMENTS", elements)
        n, mean, m2 = calibration.batch_moments(x)
        assert n == expected[0] and torch.equal(mean, expected[1]) and torch.equal(m2, expected[2]), elements
    assert torch.equal(x, original)  # the activation itself is not touched (a float64 one neither)
    x64 = x.to(torch.float64)
    copy = x64.clone()
    calibration.batch_moments(x64)
    assert torch.equal(x64, copy)


@pytest.mark.parametrize("vocab", [5, 257, 8192])
def test_causal_lm_loss_equals_transformers_loss(vocab, monkeypatch):
    """The streamed head's loss (log-probabilities a block of rows at a time) is transformers' own, bit for bit."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from adaprune.streaming import scoring

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 37, vocab, generator=g) * 10
    labels = torch.randint(0, vocab, (3, 37), generator=g)
    labels[1, ::4] = -100  # ignored positions are skipped the same way
    for elements in (1, 1 << 10, scoring.LOSS_CHUNK_ELEMENTS):
        monkeypatch.setattr(scoring, "LOSS_CHUNK_ELEMENTS", elements)
        assert torch.equal(scoring.causal_lm_loss(logits, labels, vocab), ForCausalLMLoss(logits, labels, vocab))


def test_streamed_forward_only_loss_equals_in_memory(tmp_path):
    family = next(f for f in FAMILIES if f.name == "llama")
    model, dense = _checkpoint(family, tmp_path)
    in_memory = Pruner(model, **dict(STREAMABLE, estimators=("activation",)))
    in_memory.score(_batches())
    streamed = Pruner(empty_model(dense), offload=dense, **dict(STREAMABLE, estimators=("activation",)))
    streamed.score(_batches())
    assert streamed.calibration["mean_loss"] == in_memory.calibration["mean_loss"]
    assert streamed.model.loss_function is model.loss_function  # the model's own loss again afterwards
    assert "_loss_function" not in vars(streamed.model)


class _WholeModelStage(Stage):
    name = "whole"

    def run(self, model, plan, context):
        return {}


@pytest.mark.parametrize("options,message", [
    (dict(estimators=("learned",), fusion="fixed"), r"estimator\(s\) \['learned'\].*run the whole model"),
    (dict(fusion="fixed", reconstruct={"add_bias": True}), r"cannot add biases.*drop add_bias"),
    (dict(fusion="fixed", stages=[_WholeModelStage()]), r"stage\(s\) \['whole'\].*Save the pruned checkpoint first"),
])
def test_what_cannot_stream_is_refused(options, message, tmp_path):
    family = next(f for f in FAMILIES if f.name == "llama")
    _, dense = _checkpoint(family, tmp_path)
    with pytest.raises(ConfigurationError, match=message):
        Pruner(empty_model(dense), offload=dense, progress=False, **options)


def test_offload_refusals(tmp_path):
    family = next(f for f in FAMILIES if f.name == "llama")
    model, dense = _checkpoint(family, tmp_path)
    with pytest.raises(ConfigurationError, match="meta device.*offload="):
        Pruner(empty_model(dense), **STREAMABLE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="no safetensors weights.*save_pretrained"):
        Pruner(empty_model(dense), offload=tmp_path / "empty", **STREAMABLE)
    pruner = Pruner(empty_model(dense), offload=dense, **STREAMABLE)
    plan = pruner.plan(_batches())
    with pytest.raises(ConfigurationError, match=r"pruner.save\(plan, out\)"):
        pruner.apply(plan)
    first = sorted(dense.glob("*.safetensors"))[-1]
    first.unlink()  # a shard gone: refused with the file's name, nothing written
    with pytest.raises(Exception, match="safetensors|No such file"):
        pruner.save(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _cli_checkpoint(tmp_path, sentences: int):
    """A tiny Llama checkpoint with a tokenizer, and a calibration text of `sentences` sentences."""
    family = next(f for f in FAMILIES if f.name == "llama")
    _, dense = _checkpoint(family, tmp_path)
    word_tokenizer().save_pretrained(dense)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join([SENTENCE] * sentences))
    return dense, text


SENTENCE = "the cat sat on a mat . the dog ran home"


def test_cli_offload_equals_in_memory(tmp_path, capsys):
    dense, text = _cli_checkpoint(tmp_path, 30)
    common = [str(dense), "--calib", str(text), "--samples", "4", "--seq-len", "16", "--ratio", "0.3"]
    assert cli_main(["prune", *common, "--out", str(tmp_path / "mem")]) == 0
    assert cli_main(["prune", *common, "--offload", "--out", str(tmp_path / "streamed")]) == 0
    ids = _batches(seed=3)[0]
    assert torch.equal(_logits(tmp_path / "streamed", ids), _logits(tmp_path / "mem", ids))
    assert json.loads((tmp_path / "streamed" / "adaprune_plan.json").read_text())["layers"] == \
        json.loads((tmp_path / "mem" / "adaprune_plan.json").read_text())["layers"]


def test_cli_refit_reads_more_rows_than_the_plan_in_memory_and_streamed(tmp_path, capsys):
    """The plan reads --samples rows, the reconstruction its default 128 from the same text (or the plan's
    rows, with a note, when the text is too short); offload reads the same rows as in memory."""
    dense, text = _cli_checkpoint(tmp_path, 120)
    common = [str(dense), "--calib", str(text), "--samples", "4", "--seq-len", "8", "--ratio", "0.3"]
    assert cli_main(["prune", *common, "--out", str(tmp_path / "mem")]) == 0
    assert cli_main(["prune", *common, "--offload", "--out", str(tmp_path / "streamed")]) == 0
    for folder in ("mem", "streamed"):
        plan = json.loads((tmp_path / folder / "adaprune_plan.json").read_text())
        assert plan["stages"]["reconstruct"]["rows"] == 128, folder
    ids = _batches(seed=3)[0]
    assert torch.equal(_logits(tmp_path / "streamed", ids), _logits(tmp_path / "mem", ids))
    text.write_text("\n\n".join([SENTENCE] * 10))
    capsys.readouterr()
    assert cli_main(["prune", *common, "--out", str(tmp_path / "short")]) == 0
    assert "the reconstruction reads the plan's 4" in capsys.readouterr().err
    assert json.loads((tmp_path / "short" / "adaprune_plan.json").read_text())["stages"]["reconstruct"]["rows"] == 4


def test_cli_offload_refusals(tmp_path, capsys):
    family = next(f for f in FAMILIES if f.name == "llama")
    _, dense = _checkpoint(family, tmp_path)
    word_tokenizer().save_pretrained(dense)
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert cli_main(["prune", str(gguf_file), "--offload", "--fusion", "fixed", "--out", str(tmp_path / "a")]) == 2
    assert "--offload streams layers from safetensors files" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
