"""The budget and the structural rules every allocator shares: eligible layers, floors, rounding.

Written once here, so that the allocators cannot disagree on them:

* a layer keeps at least one KV group, unless its whole attention block goes;
* query heads go in the same number from every KV group, and each group keeps at least one;
* a kept MLP width is one of `kept_widths(width, multiple)`: a multiple of `multiple` (at least
  one multiple), or the full width.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from ..specs.base import LayerShape
from ..vocabulary import UnitKind

if TYPE_CHECKING:
    from ..units.table import UnitTable


@dataclass(frozen=True)
class Budget:
    """What to remove: `ratio` of the prunable parameters, of the kinds `units`, from the `layers` given."""

    ratio: float
    units: tuple[UnitKind, ...]
    layers: list[int]
    multiple: int = 8


def eligible_layers(num_layers: int, layers: Iterable[int] | str | int | None) -> list[int]:
    """Layer indices that may be pruned: None (all), an index, indices (negative count from the end),
    or a ``"start:stop"`` range. A string without a colon is one index ("2" is layer 2, not ``slice(2)``)."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, str):
        text = layers.strip()
        if ":" not in text:
            try:
                index = int(text)
            except ValueError:
                raise ConfigurationError(f"layers={layers!r} is neither a layer index nor a 'start:stop' range of "
                                         "layer indices (e.g. '4:-2').") from None
            # Outside the try: ConfigurationError is a ValueError, and "layer 99 of 3" must say so.
            return eligible_layers(num_layers, [index])
        try:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            chosen = list(range(num_layers))[slice(*parts)]
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"layers={layers!r} is not a 'start:stop' range of layer indices "
                                     "(e.g. '4:-2').") from error
        if not chosen:
            raise ConfigurationError(f"layers={layers!r} selects no layer of the {num_layers}; widen the range.")
        return chosen
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [int(layers)]
    try:
        indices = list(layers)
    except TypeError:
        raise ConfigurationError(f"layers={layers!r} is not a layer index, a list of them or a 'start:stop' "
                                 "range.") from None
    chosen = []
    for index in indices:
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise ConfigurationError(f"layers= holds {index!r}, which is not a layer index (an integer).")
        if not -num_layers <= index < num_layers:
            raise ConfigurationError(f"layers= names layer {index}, but the model has {num_layers} layers.")
        chosen.append(int(index) % num_layers)
    return sorted(set(chosen))


def kept_widths(width: int, multiple: int) -> list[int]:
    """The MLP widths a layer of `width` channels may keep, widest first.

    With `multiple` > 1 (and a width of at least one multiple): the full width, then every multiple
    of `multiple` below it; otherwise any width from `width` down to 1.
    """
    if multiple <= 1 or width < multiple:
        return list(range(width, 0, -1))
    multiples = list(range(multiple * (width // multiple), 0, -multiple))
    return multiples if multiples[0] == width else [width, *multiples]


def round_kept(kept: float, width: int, multiple: int) -> int:
    """The kept width nearest `kept` among `kept_widths(width, multiple)` (the full width included:
    a layer asked to keep all its channels keeps them, multiple or not)."""
    if multiple > 1 and width >= multiple:
        rounded = int(min(max(multiple * round(kept / multiple), multiple), width))
        return width if width - kept < abs(rounded - kept) else rounded
    return int(min(max(round(kept), 1), width))


def channel_chunks(width: int, multiple: int) -> list[int]:
    """Successive channel counts to remove so that every width left is one of `kept_widths`."""
    widths = kept_widths(width, multiple)
    return [a - b for a, b in zip(widths, widths[1:])]


def removable_kv_groups(shape: LayerShape) -> int:
    """How many KV groups may go from a layer whose attention block stays (one must stay)."""
    return max(shape.attention.num_kv_heads - 1, 0)


def removable_heads_per_group(shape: LayerShape) -> int:
    """How many query heads may go from every KV group (one head of each must stay)."""
    return max(shape.attention.heads_per_group - 1, 0)


def check_multiple(units: UnitTable, layers: list[int], kinds: tuple[UnitKind, ...], multiple: int) -> None:
    """Refuse a `multiple` wider than an eligible layer's MLP: no kept width could honour it."""
    if UnitKind.CHANNELS not in kinds or multiple <= 1:
        return
    for i in layers:
        width = units.layers[i].shape.mlp_width
        if 0 < width < multiple:
            raise ConfigurationError(f"multiple={multiple} is larger than the MLP width {width} of layer {i}, so no "
                                     f"kept width could be a multiple of it; choose multiple <= {width} (1 keeps "
                                     "any width).")
