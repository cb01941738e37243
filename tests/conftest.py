import os

import pytest
import torch

from families import FAMILIES, Shape, build

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(params=FAMILIES, ids=lambda f: f.name)
def family(request):
    return request.param


@pytest.fixture
def tiny_gqa():
    """A Llama with grouped-query attention: 2 KV groups of 3 query heads, 3 layers."""
    return build(FAMILIES[0], Shape(layers=3, kv_heads=2, heads_per_group=3, head_dim=8, width=40))


def random_batches(vocab: int, count: int = 2, batch: int = 2, seq: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(count)]
