"""Model-agnostic evaluation of Hugging Face causal LMs: perplexity, multiple choice, speed.

Every function only calls ``model(input_ids=..., ...)`` and reads ``.logits`` (or ``model.generate``),
runs without gradients, and leaves the model's train/eval mode as it found it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["choice_loglikelihoods", "load_mc_task", "multiple_choice", "perplexity", "prefill_tokens_per_second",
           "tokens_per_second"]


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put the model in eval mode without gradients, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.LongTensor,
    *,
    seq_len: int = 128,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Perplexity of ``model`` on a 1-D token stream, over non-overlapping windows of ``seq_len``.

    The incomplete tail of the stream is dropped, and at most ``max_windows`` windows are used.
    In each window every token after the first is predicted, so ``tokens = windows * (seq_len - 1)``.
    Returns ``{"perplexity", "nll" (mean per predicted token, nats), "tokens", "windows"}``.
    """
    if token_ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    windows = token_ids.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one window of {seq_len}")

    device = _device(model)
    data = token_ids[: windows * seq_len].view(windows, seq_len).long()
    total_nll = 0.0
    with _eval_mode(model):
        for batch in tqdm(data.split(batch_size), desc="perplexity", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
    tokens = windows * (seq_len - 1)
    mean_nll = total_nll / tokens
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": tokens, "windows": windows}


def _parse_example(example: Any, where: str) -> dict[str, Any]:
    """One BIG-bench example as ``{"input": str, "choices": [str], "scores": [float]}``."""
    if not isinstance(example, dict):
        raise ValueError(f"{where}: expected an object, got {type(example).__name__}")
    if "choices" in example and "scores" in example:  # already parsed
        question, choices, scores = example["input"], list(example["choices"]), list(example["scores"])
    else:
        target_scores = example.get("target_scores")
        if not isinstance(target_scores, dict):
            raise ValueError(f"{where}: needs a 'target_scores' object mapping each choice to a score")
        question, choices, scores = example.get("input"), list(target_scores), list(target_scores.values())
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'input' must be a string")
    if len(choices) < 2 or len(choices) != len(scores):
        raise ValueError(f"{where}: needs at least two choices, each with a score")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: choices must be non-empty strings")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError(f"{where}: scores must be numbers")
    return {"input": question, "choices": choices, "scores": [float(s) for s in scores]}


def load_mc_task(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a BIG-bench multiple-choice JSON task.

    The file holds ``{"examples": [{"input": str, "target_scores": {choice: score}}, ...]}``.
    Returns one ``{"input", "choices", "scores"}`` dict per example, in file order; a choice is
    correct when its score is the example's highest. Raises ValueError for a malformed file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{path}: expected a JSON object with a non-empty 'examples' list")
    return [_parse_example(example, f"{path}: example {i}") for i, example in enumerate(examples)]


def _choice_token_ids(tokenizer: Any, question: str, choice: str) -> tuple[list[int], int]:
    """Ids of question + " " + choice, and the index where the choice's tokens start.

    The whole string is tokenized at once, so the choice is tokenized as it would appear in running
    text (as lm-eval does), and the context is ``tokenize(question)``. If a tokenizer merges tokens
    across the boundary, the choice starts after the longest shared prefix instead.
    """
    context = tokenizer(question)["input_ids"]
    full = tokenizer(question + " " + choice)["input_ids"]
    start = 0
    while start < min(len(context), len(full) - 1) and context[start] == full[start]:
        start += 1
    return full, max(start, 1)  # the first token has nothing to be predicted from


def _examples(examples_or_path: str | os.PathLike[str] | Sequence[dict[str, Any]], limit: int | None) -> list[dict]:
    if isinstance(examples_or_path, (str, os.PathLike)):
        examples = load_mc_task(examples_or_path)
    else:
        examples = [_parse_example(example, f"example {i}") for i, example in enumerate(examples_or_path)]
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError("no examples to score")
    return examples


def choice_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    examples_or_path: str | os.PathLike[str] | Sequence[dict[str, Any]],
    *,
    limit: int | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """Per item, the summed log-likelihood of each choice's tokens after the question (what
    :func:`multiple_choice` ranks). The choices of one item are scored in one right-padded forward pass.
    """
    examples = _examples(examples_or_path, limit)
    device = _device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = []
    with _eval_mode(model):
        for example in tqdm(examples, desc="multiple choice", disable=not progress):
            question = example["input"].rstrip()  # BIG-bench inputs often end in a space
            encoded = [_choice_token_ids(tokenizer, question, choice) for choice in example["choices"]]
            width = max(len(ids) for ids, _ in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, (ids, _) in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            # Only the positions that predict a choice's tokens need logits: the vocabulary
            # projection of the question would be thrown away.
            kept = {"logits_to_keep": width - min(start for _, start in encoded) + 1} if keeps_logits else {}
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kept).logits
            offset = width - logits.shape[1]  # logits[:, j] predicts the token at offset + j + 1
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_logprobs = logprobs.gather(-1, input_ids[:, offset + 1:, None]).squeeze(-1).cpu()
            out.append([token_logprobs[row, start - 1 - offset : len(ids) - 1 - offset].sum().item()
                        for row, (ids, start) in enumerate(encoded)])
    return out


def _picks(examples: list[dict], loglikelihoods: list[list[float]]) -> tuple[list[int], list[int]]:
    """Per item, the chosen choice: by summed log-likelihood, and by log-likelihood per character."""
    raw, norm = [], []
    for example, loglik in zip(examples, loglikelihoods):
        lengths = [len(" " + choice) for choice in example["choices"]]
        raw.append(max(range(len(loglik)), key=loglik.__getitem__))
        norm.append(max(range(len(loglik)), key=lambda i: loglik[i] / lengths[i]))
    return raw, norm


def _right(examples: list[dict], picks: list[int]) -> list[int]:
    return [int(example["scores"][pick] == max(example["scores"])) for example, pick in zip(examples, picks)]


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    examples_or_path: str | os.PathLike[str] | Sequence[dict[str, Any]],
    *,
    limit: int | None = None,
    progress: bool = False,
    reference: torch.nn.Module | Sequence[Sequence[float]] | None = None,
) -> dict[str, float | int]:
    """Zero-shot multiple-choice accuracy, scoring each choice by its log-likelihood after the question.

    ``accuracy`` takes the choice with the highest summed log-likelihood of its tokens;
    ``accuracy_norm`` divides that by the number of characters of the continuation ``" " + choice``
    (like lm-eval's ``acc_norm``). Standard errors are ``sqrt(p * (1 - p) / n)``. The choices of
    one item are scored in one right-padded forward pass. ``examples_or_path`` is a BIG-bench JSON
    path or a list of examples (as from ``load_mc_task``, or raw BIG-bench ones); ``limit`` keeps the
    first ones. Returns ``{"accuracy", "accuracy_stderr", "accuracy_norm", "accuracy_norm_stderr", "items"}``.

    ``reference`` (the dense model, sharing ``tokenizer``; or its :func:`choice_loglikelihoods` on the
    same items, to score it once for many models) compares the two item by item, which two accuracies
    of a few hundred items each cannot do within their noise. Added keys:
    ``reference_accuracy[_norm]``; ``accuracy[_norm]_delta``, this model's accuracy minus the
    reference's, with ``accuracy[_norm]_delta_stderr`` the standard error of the mean per-item
    difference (paired: the same items, so smaller than the two accuracies' own errors);
    ``agreement[_norm]``, the share of items where both pick the same choice; ``choice_kl``, the mean
    KL divergence from the reference's distribution over the choices (softmax of the per-character
    log-likelihoods) to this model's.
    """
    examples = _examples(examples_or_path, limit)
    loglikelihoods = choice_loglikelihoods(model, tokenizer, examples, progress=progress)
    picks = _picks(examples, loglikelihoods)
    n = len(examples)
    result: dict[str, float | int] = {}
    for key, chosen in zip(("accuracy", "accuracy_norm"), picks):
        result[key] = sum(_right(examples, chosen)) / n
        result[f"{key}_stderr"] = _stderr(result[key], n)
    result["items"] = n
    if reference is None:
        return result
    if isinstance(reference, torch.nn.Module):
        vocabularies = {getattr(net.config, "vocab_size", None) for net in (model, reference) if hasattr(net, "config")}
        if len(vocabularies - {None}) > 1:
            raise ValueError(f"the reference's vocabulary differs from the model's ({sorted(vocabularies - {None})}): "
                             "compare a pruned model with the model it was pruned from, on the same tokenizer.")
        reference = choice_loglikelihoods(reference, tokenizer, examples, progress=progress)
    if len(reference) != n or any(len(r) != len(e["choices"]) for r, e in zip(reference, examples)):
        raise ValueError(f"reference scores do not match the items: {len(reference)} items for {n}, or other "
                         "choice counts; pass choice_loglikelihoods(dense, tokenizer, the same examples).")
    reference = [list(map(float, r)) for r in reference]
    for key, chosen, reference_chosen in zip(("accuracy", "accuracy_norm"), picks, _picks(examples, reference)):
        differences = [a - b for a, b in zip(_right(examples, chosen), _right(examples, reference_chosen))]
        mean = sum(differences) / n
        result[f"reference_{key}"] = result[key] - mean
        result[f"{key}_delta"] = mean
        result[f"{key}_delta_stderr"] = math.sqrt(max(sum(d * d for d in differences) / n - mean * mean, 0.0) / n)
        result[key.replace("accuracy", "agreement")] = sum(a == b for a, b in zip(chosen, reference_chosen)) / n
    kl = 0.0
    for example, mine, theirs in zip(examples, loglikelihoods, reference):
        lengths = torch.tensor([len(" " + choice) for choice in example["choices"]], dtype=torch.float64)
        p = torch.log_softmax(torch.tensor(theirs, dtype=torch.float64) / lengths, 0)
        q = torch.log_softmax(torch.tensor(mine, dtype=torch.float64) / lengths, 0)
        kl += torch.sum(p.exp() * (p - q)).item()
    result["choice_kl"] = kl / n
    return result


def tokens_per_second(
    model: torch.nn.Module,
    *,
    prompt_len: int = 64,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> float:
    """Greedy generation speed: generated tokens per second, median over ``repeats`` timed runs.

    Prompts are random token ids (seeded), and exactly ``new_tokens`` tokens are generated per row
    (``min_new_tokens = max_new_tokens``), after one untimed warm-up run.
    """
    if min(prompt_len, new_tokens, batch_size, repeats) < 1:
        raise ValueError("prompt_len, new_tokens, batch_size and repeats must all be >= 1")
    device = _device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (batch_size, prompt_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    config = getattr(model, "generation_config", None)
    pad_id = next(
        (i for i in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)) if i is not None), 0
    )
    if isinstance(pad_id, list):
        pad_id = pad_id[0]

    def run() -> float:
        """Seconds for one generate call."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        generated = output.shape[1] - prompt_len
        if generated != new_tokens:
            raise RuntimeError(f"generate produced {generated} tokens instead of {new_tokens}")
        return elapsed

    with _eval_mode(model):
        run()  # warm-up
        seconds = statistics.median(run() for _ in range(repeats))
    return batch_size * new_tokens / seconds


def prefill_tokens_per_second(
    model: torch.nn.Module, *, seq_len: int = 128, batch_size: int = 4, repeats: int = 3, seed: int = 0
) -> float:
    """Forward-pass throughput (the prompt-processing side of serving): tokens per second.

    Median over ``repeats`` timed forward passes of ``batch_size`` x ``seq_len`` random token ids
    (seeded), after one untimed warm-up pass.
    """
    if min(seq_len, batch_size, repeats) < 1:
        raise ValueError("seq_len, batch_size and repeats must all be >= 1")
    device = _device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with _eval_mode(model):
        run()  # warm-up
        seconds = statistics.median(run() for _ in range(repeats))
    return batch_size * seq_len / seconds
