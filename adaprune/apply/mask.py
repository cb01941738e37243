"""The reversible applier: zero every slice a plan removes, keeping the values to put them back."""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from ..errors import MaskedModelWarning, PlanError
from ..plan import Plan
from ..units.table import UnitTable
from .compensation import bias_shifts
from .positions import block_path, check, complement, pruned_positions

#: The attribute a masked model carries (its MaskHandle) until it is restored.
MASKED = "adaprune_mask"


class MaskHandle:
    """Keeps the values a mask zeroed (or a stage after it changed), so that `restore()` puts them back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        self._zeroed: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # what the plan removed
        self._added_biases: list[nn.Linear] = []
        self._config: list[tuple[object, str, object]] = []

    def zero(self, tensor: torch.Tensor, dim: int, positions: torch.Tensor) -> None:
        positions = positions.to(tensor.device)
        self._saved.append((tensor, dim, positions, tensor.detach().index_select(dim, positions).clone()))
        self._zeroed.append((tensor, dim, positions))
        with torch.no_grad():
            tensor.index_fill_(dim, positions, 0)

    def shift(self, tensor: torch.Tensor, delta: torch.Tensor) -> None:
        """Add `delta` to a 1-D tensor (a bias), keeping its old values."""
        self.replace(tensor, tensor.detach() + delta.to(device=tensor.device, dtype=tensor.dtype))

    def replace(self, tensor: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite `tensor` with `values` (same shape), keeping its old values."""
        everything = torch.arange(tensor.shape[0], device=tensor.device)
        self._saved.append((tensor, 0, everything, tensor.detach().clone()))
        with torch.no_grad():
            tensor.copy_(values.to(device=tensor.device, dtype=tensor.dtype))

    def add_bias(self, linear: nn.Linear) -> None:
        """Give `linear` a zero bias (it computes the same); `restore()` takes it away again."""
        weight = linear.weight
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
        self._added_biases.append(linear)

    def set_config(self, config: object, key: str, value: object) -> None:
        """Set a config key, keeping its old value for `restore()`."""
        self._config.append((config, key, getattr(config, key, None)))
        setattr(config, key, value)

    def original(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` as it was before the mask (and every change recorded since)."""
        values = tensor.detach().clone()
        for saved, dim, positions, old in reversed(self._saved):
            if saved is tensor:
                values.index_copy_(dim, positions, old)
        return values

    def zeroes(self, tensor: torch.Tensor) -> bool:
        """Whether the mask zeroed any entry of `tensor`."""
        return any(zeroed is tensor for zeroed, _, _ in self._zeroed)

    def removed(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The entries of `tensor` the mask zeroed (a boolean tensor of its shape), or None if none."""
        removed = None
        for zeroed, dim, positions in self._zeroed:
            if zeroed is tensor:
                if removed is None:
                    removed = torch.zeros(tensor.shape, dtype=torch.bool, device=tensor.device)
                removed.index_fill_(dim, positions, True)
        return removed

    def release(self) -> None:
        """Forget the saved values: the model stays as it is now, and counts as masked no more."""
        self._saved.clear()
        self._zeroed.clear()
        self._added_biases.clear()
        self._config.clear()
        if getattr(self.model, MASKED, None) is self:
            delattr(self.model, MASKED)
            self.model.__dict__.pop("save_pretrained", None)  # the class's own again

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, dim, positions, values in reversed(self._saved):
                tensor.index_copy_(dim, positions, values)
        for linear in reversed(self._added_biases):
            linear.bias = None
        for config, key, value in reversed(self._config):
            setattr(config, key, value)
        self.release()


def is_masked(model: nn.Module) -> bool:
    """Whether a plan is applied to `model` as a mask (and not restored yet)."""
    return getattr(model, MASKED, None) is not None


def mask(plan: Plan, model: nn.Module, units: UnitTable) -> MaskHandle:
    """Zero every parameter slice the plan removes. Returns a handle that can restore them.

    A model that is masked already is refused: masks do not stack (restore the first one, or
    slice it). Everything is checked before the first tensor changes.
    """
    if is_masked(model):
        raise PlanError("The model is masked already (apply(plan, mode='mask') earlier): restore() it first, or "
                        "slice instead; masks do not stack.")
    check(plan, model, units)
    shifts = bias_shifts(plan, model, units)  # from the weights as they are, before any is zeroed
    handle = MaskHandle(model)
    for _, linear, axis, kept in pruned_positions(plan, units, model):
        dim = 0 if axis == "out" else 1
        dropped = complement(kept, linear.weight.shape[dim])
        handle.zero(linear.weight, dim, dropped)
        if axis == "out" and linear.bias is not None:
            handle.zero(linear.bias, 0, dropped)
    # A block that goes whole: every parameter zeroed makes it output zeros (see specs.base.Block).
    for layer_plan, layer in zip(plan.layers, units):
        for kind in layer_plan.removed_blocks():
            for param in model.get_submodule(block_path(units, layer.path, kind)).parameters():
                handle.zero(param, 0, torch.arange(param.shape[0]))
    for bias, delta in shifts:
        handle.shift(bias, delta)
    setattr(model, MASKED, handle)
    if callable(getattr(type(model), "save_pretrained", None)):
        # A bound method (not a closure), so that a deep copy of the model warns about the copy.
        model.save_pretrained = types.MethodType(_masked_save_pretrained, model)
    return handle


def _masked_save_pretrained(self: nn.Module, *args, **kwargs):
    """save_pretrained of a masked model: it works, and says that the checkpoint is full-size zeros."""
    if is_masked(self):
        warnings.warn(MaskedModelWarning(
            "This model is masked (apply(plan, mode='mask')): save_pretrained writes every zeroed unit at full size, "
            "a checkpoint as large as the original. To save a smaller model, slice it first: pruner.restore(), then "
            "pruner.apply(plan, mode='slice')."), stacklevel=2)
    return type(self).save_pretrained(self, *args, **kwargs)
