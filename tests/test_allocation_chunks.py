"""The global allocation's channel chunks, computed a run of equal sizes at a time, are exactly the
chunks taken one by one: the same positions, in the same order, with bit-identical mean scores."""

from __future__ import annotations

import pytest
import torch

from adaprune.allocation.budget import channel_chunks
from adaprune.allocation.ranked import _lowest_first


def _one_by_one(site: torch.Tensor, sizes: list[int]) -> list[tuple[list[int], float]]:
    values = site.tolist()
    order = sorted(range(len(values)), key=lambda c: (values[c], c))
    chunks, start = [], 0
    for size in sizes:
        chunk = sorted(order[start:start + size])
        start += size
        chunks.append((chunk, float(site[chunk].mean())))
    return chunks


@pytest.mark.parametrize("width,multiple", [(1536, 8), (5632, 8), (11008, 8), (1000, 3), (97, 1), (45, 8)])
@pytest.mark.parametrize("seed", range(3))
def test_chunks_equal_the_one_by_one_reference(width, multiple, seed):
    g = torch.Generator().manual_seed(seed)
    site = torch.rand(width, generator=g, dtype=torch.float64) ** 3 * 7
    site[torch.randint(0, width, (width // 10,), generator=g)] = 0.5  # ties: broken by position
    sizes = channel_chunks(width, multiple)
    got, want = _lowest_first(site, sizes), _one_by_one(site, sizes)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert [m for _, m in got] == [m for _, m in want]  # exact float equality
