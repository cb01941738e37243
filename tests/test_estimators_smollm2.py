"""Slow: every estimator prunes the real SmolLM2-135M by 20% better than random unit choice.

One calibration pass serves all the estimators (a module-scoped ScoreCache); each is then planned
from the cache, applied as a mask, evaluated on held-back Wikipedia text and restored. The pruned
units are MLP channels: with only 3 KV groups per layer, removing whole groups makes perplexity a
lottery of single choices (random seeds alone span 500 to 35,000), while 27% of 1536 channels per
layer compares estimators on thousands of decisions.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from adaprune import Pruner

pytestmark = pytest.mark.slow

RATIO = 0.2
SEQ_LEN = 128
EVAL_WINDOWS = 16
# `magnitude` is not here: weight size alone chooses worse than chance on this model (measured:
# perplexity 750,669 against 642 for random channels), as LLM-Pruner's paper reported for LLaMA-7B
# (its L2-magnitude baseline far behind random pruning at 20 %). It stays a baseline, not a method.
ESTIMATORS = {
    "taylor": "taylor",
    "activation": "activation",
    "fluctuation": "fluctuation",
    "learned": {"name": "learned", "steps": 6, "batch_size": 2},
}
RANDOM_SEEDS = (0, 1)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adaprune-random-plugin" / "adaprune_random.py"


def random_estimator(seed: int):
    """The example plugin's seeded random estimator, loaded from its file (no install needed here)."""
    spec = importlib.util.spec_from_file_location("adaprune_random_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RandomEstimator(seed)


@pytest.fixture(scope="module")
def smollm2():
    from adaprune.tools.data import load_smollm2, test_token_stream, token_batches, wiki_texts

    model, tokenizer = load_smollm2()
    calibration = token_batches(tokenizer, wiki_texts("calibration"), seq_len=SEQ_LEN, num_samples=8, batch_size=4)
    cache = Pruner(model, estimators=list(ESTIMATORS.values()), progress=False).score(calibration)
    stream = test_token_stream(tokenizer, max_tokens=SEQ_LEN * EVAL_WINDOWS)
    return model, cache, stream


def pruned_perplexity(model, stream, estimator, cache=None) -> float:
    """Perplexity with the estimator's plan applied as a mask; the model is restored afterwards."""
    from adaprune.tools.evaluate import perplexity

    # Uniform allocation: the estimators are compared on the same per-layer budget (global would let each
    # reweigh the layers by its own block scores).
    pruner = Pruner(model, ratio=RATIO, estimators=[estimator], fusion="fixed", allocation="uniform", units=["channels"],
                    mode="mask",
                    progress=False)
    plan = pruner.plan(scores=cache)
    assert abs(plan.params["removed"] / plan.params["prunable_before"] - RATIO) < 0.02
    pruner.apply(plan)
    try:
        return perplexity(model, stream, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)["perplexity"]
    finally:
        pruner.restore()


@pytest.fixture(scope="module")
def random_perplexity(smollm2):
    model, _, stream = smollm2
    return min(pruned_perplexity(model, stream, random_estimator(seed)) for seed in RANDOM_SEEDS)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_beats_random_unit_choice(smollm2, random_perplexity, name):
    model, cache, stream = smollm2
    ppl = pruned_perplexity(model, stream, ESTIMATORS[name], cache)
    print(json.dumps({"estimator": name, "perplexity": round(ppl, 2), "random_best_seed": round(random_perplexity, 2)}))
    assert ppl < random_perplexity
