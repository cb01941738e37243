"""GGUF export: llama.cpp computes what PyTorch does, for uniform and per-layer shapes.

Tiny pruned models of each exported family (llama, mistral, qwen2), with SmolLM2's vocabulary size
and tokenizer, are written at f32 and run in llama.cpp (llama-cpp-python, the `llama` extra); their
next-token logits must match PyTorch's at every position: |difference| <= 1e-4 + 1e-4 * |logit|
(float32 in both, KV cache included; the two sum in different orders: seen ~2e-6). The slow test runs the pruned SmolLM2.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from adaprune import ExportError, Pruner, UnsupportedArchitectureError, export_gguf, unit_table
from adaprune.tools.cli import main
from adaprune.tools.llama_runtime import open_gguf
from families import FAMILIES, Shape, build, prune_by_hand

try:
    import llama_cpp
except ImportError:
    if os.environ.get("CI"):  # CI installs the llama extra (make setup): a missing runtime must fail there
        raise
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None,
                                     reason="llama.cpp runtime missing: pip install -e '.[llama]' (make setup)")

VOCAB = 49152  # SmolLM2's
IDS = [5, 17, 3, 42, 8, 1, 64, 23, 11, 4000, 49151, 7, 300, 12]
RTOL = ATOL = 1e-4


def family(name: str):
    return next(f for f in FAMILIES if f.name == name)


@pytest.fixture(scope="module")
def tokenizer():
    from adaprune.tools.data import smollm2_path

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


def tiny(name: str, window: int | None = None):
    model = build(family(name), Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=16, width=48, vocab=VOCAB))
    if name == "mistral":  # the tiny Mistral's window (4) is shorter than IDS: llama.cpp has no sliding window
        model.config.sliding_window = window
    return model




def llama_cpp_logits(path, ids) -> np.ndarray:
    # An f32 KV cache (llama.cpp keeps f16 by default): the comparison is of float32 arithmetic only.
    llm = open_gguf(path, n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return logits


def assert_same_logits(model, tokenizer, tmp_path, name="model"):
    path = export_gguf(model, tokenizer, tmp_path / f"{name}.gguf", dtype="f32")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    actual = llama_cpp_logits(path, IDS)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    return gguf.GGUFReader(path)


def arch(reader) -> str:
    return reader.get_field("general.architecture").contents()


PLANS = {
    "uniform": dict(remove_heads=[[1, 3]] * 3, remove_channels=[[0, 5, 9]] * 3),
    "uniform-mlp": dict(remove_channels=[[0, 5, 9, 30]] * 3),
    "per-layer": dict(remove_heads=[[], [0, 3], []], remove_kv_groups=[[1], [], []],
                      remove_channels=[[1, 2], list(range(20)), []]),
    "blocks": dict(remove_kv_groups=[[1], [], []], remove_attention=[False, True, False],
                   remove_mlp=[False, False, True]),
}


@needs_llama_cpp
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "llama-untied-biased"])
def test_llama_cpp_gives_pytorch_logits(name, plan, tokenizer, tmp_path):
    model = prune_by_hand(tiny(name), **PLANS[plan])
    reader = assert_same_logits(model, tokenizer, tmp_path)
    # Uniform shapes keep the family's architecture; per-layer shapes go to "deci", and so does a
    # Qwen2 that lost heads (llama.cpp's "qwen2" builds its query projection hidden_size wide).
    native = plan == "uniform-mlp" or (plan == "uniform" and name != "qwen2")
    expected_arch = ("qwen2" if name == "qwen2" else "llama") if native else "deci"
    assert arch(reader) == expected_arch
    heads = reader.get_field("llama.attention.head_count" if expected_arch == "llama" else
                             f"{expected_arch}.attention.head_count").contents()
    if plan == "per-layer":
        assert heads == [2, 2, 4]


@needs_llama_cpp
def test_mistral_window_becomes_the_trained_context(tokenizer, tmp_path):
    """llama.cpp attends to the whole context: the file records the window as the context, inside which
    full attention is sliding-window attention."""
    model = prune_by_hand(tiny("mistral", window=6), **PLANS["per-layer"])
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    assert gguf.GGUFReader(path).get_field("deci.context_length").contents() == 6
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([IDS[:6]])).logits[0].numpy()
    np.testing.assert_allclose(llama_cpp_logits(path, IDS[:6]), expected, rtol=RTOL, atol=ATOL)


@needs_llama_cpp
def test_dense_model_keeps_its_own_architecture(tokenizer, tmp_path):
    reader = assert_same_logits(tiny("qwen2"), tokenizer, tmp_path)
    assert arch(reader) == "qwen2" and reader.get_field("qwen2.feed_forward_length").contents() == 48


@needs_llama_cpp
def test_tied_embeddings_are_written_once(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=64, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prune_by_hand(model, remove_channels=[[1, 2], list(range(10))])
    names = [t.name for t in assert_same_logits(model, tokenizer, tmp_path).tensors]
    assert "token_embd.weight" in names and "output.weight" not in names


@needs_llama_cpp
def test_global_allocation_plan_runs_in_llama_cpp(tokenizer, tmp_path):
    model = tiny("llama")
    pruner = Pruner(model, ratio=0.4, estimators=["magnitude"], allocation="global", units=["kv_groups", "channels"],
                    progress=False)
    pruner.apply(pruner.plan(), mode="slice")
    shapes = unit_table(model).shapes
    assert len(set(shapes)) > 1  # global allocation gave the layers different shapes
    assert arch(assert_same_logits(model, tokenizer, tmp_path)) == "deci"


@needs_llama_cpp
def test_layer_without_attention_or_mlp_in_the_last_layer(tokenizer, tmp_path):
    model = prune_by_hand(tiny("llama"), remove_attention=[False, False, True], remove_mlp=[False, True, True])
    assert_same_logits(model, tokenizer, tmp_path)


@needs_llama_cpp
def test_q8_0_and_f16_files_run_close_to_pytorch(tokenizer, tmp_path):
    model = prune_by_hand(tiny("llama"), **PLANS["per-layer"])
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    sizes = {}
    for dtype in ("f32", "f16", "q8_0"):
        path = export_gguf(model, tokenizer, tmp_path / f"{dtype}.gguf", dtype=dtype)
        sizes[dtype] = path.stat().st_size
        actual = llama_cpp_logits(path, IDS)
        # Rounded weights: the same top token nearly everywhere, logits close in relative terms.
        assert np.mean(actual.argmax(-1) == expected.argmax(-1)) >= 0.85
        assert np.abs(actual - expected).max() <= 0.05 * np.abs(expected).max()
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    # q8_0 pads the MLP widths (46, 28, 48) to whole 32-blocks with zero channels, and quantizes all.
    reader = gguf.GGUFReader(tmp_path / "q8_0.gguf")
    assert reader.get_field("deci.feed_forward_length").contents() == [64, 32, 64]
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {gguf.GGMLQuantizationType.Q8_0}


# ---- bad input ---------------------------------------------------------------------------------

def test_family_llama_cpp_does_not_run_is_refused(tokenizer, tmp_path):
    model = build(family("opt"), Shape(layers=1, kv_heads=2, heads_per_group=1, head_dim=8, width=16))
    with pytest.raises(ExportError, match="opt family"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")


def test_unknown_type_is_refused(tokenizer, tmp_path):
    with pytest.raises(ExportError, match="q4_k"):
        export_gguf(tiny("llama"), tokenizer, tmp_path / "x.gguf", dtype="q4_k")


def test_missing_folder_is_refused(tokenizer, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        export_gguf(tiny("llama"), tokenizer, tmp_path / "no" / "x.gguf")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder_is_refused(tokenizer, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(ExportError, match="not writable"):
        export_gguf(tiny("llama"), tokenizer, folder / "x.gguf")


def test_layer_0_without_attention_is_refused(tokenizer, tmp_path):
    model = prune_by_hand(tiny("llama"), remove_attention=[True, False, False])
    with pytest.raises(ExportError, match="Layer 0"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf")


def test_unsupported_family_is_not_even_detected_without_a_spec(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedArchitectureError):
        export_gguf(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), tokenizer, tmp_path / "x.gguf")


@needs_llama_cpp
def test_cli_export_writes_a_file_and_refuses_a_bad_type(tokenizer, tmp_path, capsys):
    model = prune_by_hand(tiny("llama"), **PLANS["per-layer"])
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert main(["export", str(folder), "--gguf", str(tmp_path / "bad.gguf"), "--type", "q3",
                 "--trust-remote-code"]) == 2
    assert "--type must be one of" in capsys.readouterr().err
    assert main(["export", str(folder), "--gguf", str(tmp_path / "out.gguf"), "--type", "f32",
                 "--trust-remote-code"]) == 0
    actual = llama_cpp_logits(tmp_path / "out.gguf", IDS)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    assert main(["export", str(folder), "--gguf", str(tmp_path / "nope" / "out.gguf"), "--trust-remote-code"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- the real model ----------------------------------------------------------------------------

@needs_llama_cpp
@pytest.mark.slow
def test_pruned_smollm2_generates_the_same_greedy_continuation(tmp_path):
    from adaprune.tools.data import SMOLLM2_GGUF, SMOLLM2_MODULE, SMOLLM2_PIP, _package_dir, load_smollm2, \
        token_batches, wiki_texts

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    batches = token_batches(tokenizer, wiki_texts("calibration"), seq_len=128, num_samples=8, batch_size=4)
    pruner = Pruner(model, ratio=0.2, progress=False)
    pruner.apply(pruner.plan(batches))
    source = _package_dir(SMOLLM2_MODULE, SMOLLM2_PIP) / SMOLLM2_GGUF
    path = export_gguf(model, tokenizer, tmp_path / "smollm2.gguf", dtype="f32", source_gguf=source)
    reader, original = gguf.GGUFReader(path), gguf.GGUFReader(source)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.pre"):
        assert reader.get_field(key).contents() == original.get_field(key).contents(), key

    llm = open_gguf(path, n_ctx=256, n_threads=1, verbose=False)
    text = wiki_texts("test")[0][:400]
    # llama.cpp tokenizes as transformers does (the special-token prefix aside).
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    actual = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        actual.append(token)
        if len(actual) == len(expected) or token == llm.token_eos():
            break
    assert actual == expected[: len(actual)] and len(actual) >= min(len(expected), 8)


# ---- PyTorch speed: adaprune eval --speed --------------------------------------------------------

def test_eval_speed_measures_dense_and_pruned_in_alternation(tmp_path, capsys):
    dense = build(family("llama"), Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=32))
    pruned = prune_by_hand(build(family("llama"), Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=32)),
                      remove_kv_groups=[[1], [1]], remove_channels=[list(range(16))] * 2)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    assert main(["eval", str(tmp_path / "pruned"), "--speed", "--speed-baseline", str(tmp_path / "dense"),
                 "--json", str(tmp_path / "speed.json")]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "in alternation" in out
    speed = json.loads((tmp_path / "speed.json").read_text())["speed"]
    assert set(speed) == {"baseline", "model", "speedup", "rounds"}
    assert all(value > 0 for value in speed["speedup"].values())


def test_eval_needs_text_or_speed(capsys):
    assert main(["eval", "nowhere"]) == 2
    assert "--text FILE" in capsys.readouterr().err
    assert main(["eval", "nowhere", "--text", "x.txt", "--speed-baseline", "y"]) == 2
    assert "--speed-baseline needs --speed" in capsys.readouterr().err
