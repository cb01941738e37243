"""The seam after apply: a stage repairs what the cut broke, never changes what the plan removed.

`Stage.run(model, plan, context)` runs once the plan is applied as a mask (so that a stage can
still see, through `context.mask`, the values the plan removed); when the Pruner slices, it does
so after the last stage. What a stage reports is recorded in `plan.stages[stage.name]`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..apply.mask import MaskHandle
from ..plan import Plan
from ..units.table import UnitTable


@dataclass(frozen=True)
class StageContext:
    """What a stage may use besides the model and the plan.

    `units` describes the model as it was before the plan (its dense shapes); `mask` holds the
    values the plan zeroed, for stages that need the dense model one layer at a time (and through
    which a stage records what it overwrites, so that `Pruner.restore()` undoes it too);
    `batches` are the calibration token batches of the planning call (empty when there were none).
    """

    units: UnitTable
    mask: MaskHandle
    batches: list[torch.Tensor]
    progress: bool = False


class Stage(ABC):
    """One step after apply (weight reconstruction, recovery, ...)."""

    name: ClassVar[str]

    @property
    def options(self) -> dict[str, Any]:
        """The stage's settings, as plans record them."""
        return {}

    @abstractmethod
    def run(self, model: nn.Module, plan: Plan, context: StageContext) -> dict[str, Any]:
        """Repair `model` (masked by `plan`) in place; return what to record about it (JSON values)."""
