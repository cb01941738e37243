"""Architecture specs: the only place that knows a model family's module names."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError
from .baichuan import BaichuanSpec
from .base import ArchSpec, AttentionShape, LayerShape, Projection
from .bloom import BloomSpec
from .llama import LlamaSpec
from .mistral import MistralSpec
from .opt import OPTSpec
from .phi3 import Phi3Spec
from .qwen2 import Qwen2Spec

_SPECS: list[type[ArchSpec]] = [LlamaSpec, MistralSpec, Qwen2Spec, Phi3Spec, OPTSpec, BloomSpec, BaichuanSpec]


def register_spec(spec: type[ArchSpec]) -> type[ArchSpec]:
    """Register a spec class (usable as a decorator). Later registrations are tried first."""
    _SPECS.insert(0, spec)
    return spec


def registered_specs() -> list[type[ArchSpec]]:
    return list(_SPECS)


def detect_spec(model: nn.Module) -> ArchSpec:
    """The spec that describes `model`, found from its config and module structure."""
    for spec in _SPECS:
        if spec.matches(model):
            return spec()
    config = getattr(model, "config", None)
    raise UnsupportedArchitectureError(
        f"adaprune has no architecture spec for {type(model).__name__} "
        f"(model_type={getattr(config, 'model_type', None)!r}). Supported families: "
        f"{', '.join(s.name for s in _SPECS)}. To add one, write a small ArchSpec subclass and "
        "register it with adaprune.specs.register_spec: see docs/adding-a-family.md."
    )


__all__ = ["ArchSpec", "AttentionShape", "LayerShape", "Projection", "detect_spec", "register_spec",
           "registered_specs"]
