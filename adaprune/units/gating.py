"""Scaling the units' input columns through forward pre-hooks, without editing any weight.

A unit reaches the rest of the model only through the input columns it owns in the projections
that read it (the o-projection columns of a head, the down-projection column of a channel).
Multiplying those columns of the projection's input by a factor scales the unit's contribution:
0 removes it, 1 keeps it. The learned estimator trains per-unit gates this way, the adaptive
fusion masks the units its current blend would remove.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

#: module path -> the factor of each of its input columns now, or None to leave the input as it is
InputFactors = Mapping[str, Callable[[], torch.Tensor | None]]


@contextmanager
def scaled_inputs(model: nn.Module, factors: InputFactors) -> Iterator[None]:
    """Multiply each named module's input by its factor while the block runs; the hooks go afterwards."""
    handles = []
    for path, factor_of in factors.items():

        def scale(_module, args, _factor_of=factor_of):
            factor = _factor_of()
            if factor is None or not args:
                return None
            x = args[0]
            return (x * factor.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        handles.append(model.get_submodule(path).register_forward_pre_hook(scale))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_column(unit_values: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Spread one value per unit over the columns it owns; columns no unit owns (owner -1) get 1."""
    return torch.where(owner >= 0, unit_values[owner.clamp(min=0)], torch.ones((), dtype=unit_values.dtype))
