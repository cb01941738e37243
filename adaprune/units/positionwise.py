"""Per-position sums of elementwise functions of a weight, computed in chunks of rows.

Estimators reduce a function of each weight (|w|, w*g, w^2, ...) to one number per row or column.
Computed on the whole matrix at once, the function's result is a temporary as large as the matrix:
above glibc's mmap threshold every such temporary is a fresh mapping, page-faulted in, and out of
the CPU's cache, which made this elementwise work several times slower per element for the
matrices of 1B-parameter models than for those of 135M ones (time growing faster than the model).
In chunks of about a megabyte the temporaries are small and stay in cache. A row's sum is taken
whole, in the function's dtype, as before; sums over rows add the chunks' partial sums in float64.

On a GPU the trade is the other way round: each chunk costs a few kernel launches, and megabyte
chunks made the launches, not the arithmetic, the cost of Taylor's calibration (about 0.5 s per
pass at 1.1B parameters on an H200). There the chunks are large (a bound on the temporaries' size
only), which for most matrices means the whole matrix at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_ELEMENTS = 1 << 18  # about 1 MiB of float32 per temporary, on the CPU
DEVICE_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32 per temporary on an accelerator: few launches


def positionwise_sum(fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """`fn(*tensors)` summed over the dimension other than `dim`: one float64 value per position along `dim`.

    `tensors` are 2-D and of one shape (a 1-D tensor, a bias, is returned as `fn(*tensors)` in
    float64). `fn` is elementwise, so applying it to chunks of rows gives the same values.
    """
    first = tensors[0]
    if first.dim() != 2:
        return fn(*tensors).to(torch.float64)
    budget = CHUNK_ELEMENTS if first.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    rows = max(1, budget // max(first.shape[1], 1))
    chunks = zip(*(t.split(rows) for t in tensors))
    if dim == 0:
        return torch.cat([fn(*chunk).sum(dim=1) for chunk in chunks]).to(torch.float64)
    total = torch.zeros(first.shape[1], dtype=torch.float64, device=first.device)
    for chunk in chunks:
        total += fn(*chunk).sum(dim=0).to(torch.float64)
    return total
