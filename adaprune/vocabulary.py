"""One vocabulary for what can be removed, shared by every stage.

* `Level`: the granularity of a unit in the ownership table (a KV group, a query head, an MLP
  channel). Scores, fusion sites and plans are keyed by level.
* `UnitKind`: what the user lets the Pruner remove (``units=[...]``): whole KV groups, query heads
  inside the groups, MLP channels, and whole attention or MLP blocks.
* `BlockKind`: the two blocks of a decoder layer that may go whole.

All three are `str` enums: they compare equal to, hash like and serialise as their values
(``Level.CHANNEL == "channel"``), so plans and score caches stay plain JSON.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from .errors import ConfigurationError


class Level(str, Enum):
    KV_GROUP = "kv_group"  # a KV head with the query heads that read it
    HEAD = "head"  # one query head (its KV group stays)
    CHANNEL = "channel"  # one MLP channel

    def __str__(self) -> str:
        return self.value

    @property
    def block(self) -> BlockKind:
        """The block a unit of this level belongs to."""
        return BlockKind.MLP if self is Level.CHANNEL else BlockKind.ATTENTION


class BlockKind(str, Enum):
    ATTENTION = "attention"
    MLP = "mlp"

    def __str__(self) -> str:
        return self.value

    @property
    def levels(self) -> tuple[Level, ...]:
        """The levels of this block's units, coarsest first."""
        return (Level.KV_GROUP, Level.HEAD) if self is BlockKind.ATTENTION else (Level.CHANNEL,)


class UnitKind(str, Enum):
    KV_GROUPS = "kv_groups"
    QUERY_HEADS = "query_heads"
    CHANNELS = "channels"
    ATTENTION_BLOCKS = "attention_blocks"
    MLP_BLOCKS = "mlp_blocks"

    def __str__(self) -> str:
        return self.value

    @property
    def level(self) -> Level | None:
        """The level whose units this kind removes (None for whole blocks)."""
        return {UnitKind.KV_GROUPS: Level.KV_GROUP, UnitKind.QUERY_HEADS: Level.HEAD,
                UnitKind.CHANNELS: Level.CHANNEL}.get(self)

    @property
    def block(self) -> BlockKind | None:
        """The block this kind removes whole (None for units inside a block)."""
        return {UnitKind.ATTENTION_BLOCKS: BlockKind.ATTENTION, UnitKind.MLP_BLOCKS: BlockKind.MLP}.get(self)


LEVELS: tuple[Level, ...] = tuple(Level)
ATTENTION_LEVELS = BlockKind.ATTENTION.levels
BLOCK_KINDS: tuple[BlockKind, ...] = tuple(BlockKind)
#: Shorthands accepted in ``units=``.
UNIT_ALIASES = {"blocks": (UnitKind.ATTENTION_BLOCKS, UnitKind.MLP_BLOCKS)}
#: Spellings that are no longer accepted, with what to say instead.
RETIRED_UNITS = {"heads": "'heads' removed whole KV groups, which the name did not say: write 'kv_groups' for "
                          "whole groups, or 'query_heads' for heads inside the groups (the same number from each)."}


def parse_units(units: Iterable[str] | str) -> tuple[UnitKind, ...]:
    """Resolve aliases and check a unit choice; refuse retired or unknown names, and contradictions."""
    if isinstance(units, str):
        units = [part.strip() for part in units.split(",") if part.strip()]
    resolved: list[UnitKind] = []
    for name in units:
        if name in RETIRED_UNITS:
            raise ConfigurationError(f"Unit {name!r} is not accepted any more: {RETIRED_UNITS[name]}")
        try:
            kinds = UNIT_ALIASES.get(name) or (UnitKind(name),)
        except ValueError:
            raise ConfigurationError(f"Unknown unit {name!r}. Choose among "
                                     f"{', '.join([*(k.value for k in UnitKind), *UNIT_ALIASES])}.") from None
        resolved += [kind for kind in kinds if kind not in resolved]
    if not resolved:
        raise ConfigurationError("units is empty; choose at least one of kv_groups, query_heads, channels.")
    if UnitKind.KV_GROUPS in resolved and UnitKind.QUERY_HEADS in resolved:
        raise ConfigurationError("Choose kv_groups (whole groups) or query_heads (heads within groups), not both.")
    return tuple(resolved)
