"""Architecture specs: the only place that knows a model family's module names.

The built-in families are a plugin (`adaprune_specs` below); a package adds one through the
``adaprune.specs`` entry-point group, a script with `register_spec`.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .baichuan import BaichuanSpec
from .base import ArchSpec, AttentionShape, LayerShape, Projection
from .bloom import BloomSpec
from .llama import LlamaSpec
from .mistral import MistralSpec
from .opt import OPTSpec
from .phi3 import Phi3Spec
from .qwen2 import Qwen2Spec

BUILTIN_SPECS: list[type[ArchSpec]] = [LlamaSpec, MistralSpec, Qwen2Spec, Phi3Spec, OPTSpec, BloomSpec, BaichuanSpec]
_REGISTERED: list[type[ArchSpec]] = []


def register_spec(spec: type[ArchSpec]) -> type[ArchSpec]:
    """Register a spec class from a script (usable as a decorator); it is tried before the built-ins.

    A package registers its families through the ``adaprune.specs`` entry-point group instead.
    """
    _REGISTERED.insert(0, spec)
    return spec


@hookimpl
def adaprune_specs() -> list[type[ArchSpec]]:
    # Specs registered from a script come first, then the built-ins in their order.
    return [*_REGISTERED, *BUILTIN_SPECS]


__all__ = ["ArchSpec", "AttentionShape", "LayerShape", "Projection", "register_spec"]
