"""The allocation interface: fused scores and a budget in, the units to remove out.

An allocator declares its properties instead of being recognised by name: `fixed_counts` (it
removes the same number of units from a site whatever the scores, so only their order within the
site matters) and `removes_blocks` (it may remove whole attention or MLP blocks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import ConfigurationError
from ..plan import LayerPlan
from ..scoring.candidates import BlockImportance
from ..specs.base import ArchSpec
from ..units.table import UnitTable
from ..vocabulary import Level, UnitKind
from .budget import Budget


@dataclass
class AllocationScores:
    """What an allocator ranks: the fused score of every unit, and each layer's block importance."""

    units: dict[Level, list[torch.Tensor]]
    blocks: BlockImportance = field(default_factory=dict)

    def layer_weight(self, kind, layer: int) -> float:
        """The layer's `kind` block importance relative to the other layers' (1 when unknown)."""
        values = self.blocks.get(kind)
        value = values[layer] if values is not None else None
        return value if value is not None and value == value and abs(value) != float("inf") and value > 0 else 1.0


class Allocator(ABC):
    """Turns fused scores and a budget into one LayerPlan per decoder layer. The model is never touched."""

    name: ClassVar[str]
    #: The same number of units goes from a site whatever its scores.
    fixed_counts: ClassVar[bool] = False
    #: Whole attention or MLP blocks may go (units ``attention_blocks``, ``mlp_blocks``).
    removes_blocks: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"allocation {self.name!r} takes no options, got {sorted(options)}")

    @property
    def options(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def allocate(self, units: UnitTable, scores: AllocationScores, budget: Budget) -> list[LayerPlan]:
        """The units to remove, one LayerPlan per layer, meeting `budget`; a ConfigurationError if it cannot."""


def check_units(units: tuple[UnitKind, ...], allocator: Allocator, spec: ArchSpec) -> None:
    """Refuse, before any work, whole-block units that the allocation or the model family cannot honour."""
    blocks = [unit for unit in units if unit.block is not None]
    if blocks and not allocator.removes_blocks:
        raise ConfigurationError(f"Whole blocks (units {', '.join(blocks)}) are only removed by an allocation that "
                                 f"removes blocks, such as allocation='global', not {allocator.name!r}: choose "
                                 "allocation='global' or drop 'blocks' from units.")
    for unit in blocks:
        if unit.block not in spec.removable_blocks():
            raise ConfigurationError(f"The {spec.name} family cannot run without its {unit.block} block (its spec "
                                     f"declares no {unit.block}_block); drop {unit!r} (or 'blocks') from units.")
