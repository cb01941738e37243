"""Slow: the real SmolLM2-135M, pruned by 20% with Taylor, against random unit choice."""

from __future__ import annotations

import json

import pytest
import torch

from adaprune import Estimator, Pruner
from adaprune.vocabulary import LEVELS

pytestmark = pytest.mark.slow

SEQ_LEN = 128
EVAL_WINDOWS = 48


class RandomScores(Estimator):
    """Seeded random unit scores: the baseline any real estimator must beat."""

    name = "random-baseline"

    def score(self, model, graph, stats):
        generator = torch.Generator().manual_seed(0)
        scores = {level: [torch.rand(layer.num_units[level], generator=generator, dtype=torch.float64)
                          for layer in graph] for level in LEVELS}
        return {"coarse": scores, "fine": scores}


@pytest.fixture(scope="module")
def smollm2():
    from adaprune.tools.data import load_smollm2, test_token_stream, token_batches, wiki_texts

    model, tokenizer = load_smollm2()
    calibration = token_batches(tokenizer, wiki_texts("calibration"), seq_len=SEQ_LEN, num_samples=16, batch_size=4)
    return model, tokenizer, calibration, test_token_stream(tokenizer)


def pruned_perplexity(model, stream, estimator, calibration):
    import copy

    from adaprune.tools.evaluate import perplexity

    pruned = copy.deepcopy(model)
    # Fixed fusion: this test is about the pipeline and the estimator; the adaptive policy has its own.
    pruner = Pruner(pruned, ratio=0.2, estimators=[estimator], fusion="fixed", allocation="uniform", progress=False)
    pruner.apply(pruner.plan(calibration))
    ppl = perplexity(pruned, stream, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)["perplexity"]
    removed = 1 - sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    return ppl, removed


def test_taylor_beats_random_choice_at_20_percent(smollm2):
    from adaprune.tools.evaluate import perplexity

    model, _, calibration, stream = smollm2
    dense = perplexity(model, stream, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)["perplexity"]
    taylor, removed = pruned_perplexity(model, stream, "taylor", calibration)
    random, random_removed = pruned_perplexity(model, stream, RandomScores(), calibration)
    print(json.dumps({"dense": dense, "taylor": taylor, "random": random, "removed": removed}))
    assert removed == pytest.approx(random_removed)
    assert 0.14 < removed < 0.2  # 20% of the prunable parameters; embeddings stay
    assert torch.isfinite(torch.tensor(taylor))
    assert dense < taylor < random
