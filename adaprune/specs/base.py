"""The architecture-spec interface: everything adaprune knows about one model family.

A spec answers, for one family, where the decoder layers are, which projections make up
attention and the MLP and how their rows and columns map to heads and channels, and which
module attributes and config keys describe those shapes. Nothing outside `adaprune.specs`
names a projection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

Axis = Literal["out", "in"]
# Owner of one block of a projection: ("q", h) for query head h, ("kv", g) for KV group g,
# ("ch", c) for MLP channel c.
Owner = tuple[str, int]


@dataclass(frozen=True)
class Projection:
    """One prunable Linear of a decoder layer, and who owns each block along its pruned axis.

    `axis="out"` prunes weight rows (and bias entries); `axis="in"` prunes weight columns.
    `owners[i]` owns rows (or columns) `i*block .. (i+1)*block`.
    """

    path: str
    axis: Axis
    owners: tuple[Owner, ...]
    block: int = 1


@dataclass(frozen=True)
class AttentionShape:
    """Head counts of one attention block. `num_heads` query heads share `num_kv_heads` KV heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerShape:
    """The prunable shape of one decoder layer."""

    attention: AttentionShape
    mlp_width: int

    def to_dict(self) -> dict[str, int]:
        return {
            "num_heads": self.attention.num_heads,
            "num_kv_heads": self.attention.num_kv_heads,
            "head_dim": self.attention.head_dim,
            "mlp_width": self.mlp_width,
        }


def query_owners(shape: AttentionShape) -> tuple[Owner, ...]:
    return tuple(("q", h) for h in range(shape.num_heads))


def kv_owners(shape: AttentionShape) -> tuple[Owner, ...]:
    return tuple(("kv", g) for g in range(shape.num_kv_heads))


def channel_owners(width: int) -> tuple[Owner, ...]:
    return tuple(("ch", c) for c in range(width))


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class ArchSpec(ABC):
    """Abstract description of one decoder-only model family.

    Subclasses are small: a few class attributes and the methods below. Register a new one
    with `adaprune.specs.register_spec`; see docs/adding-a-family.md.
    """

    #: Short family name used in plans and reports.
    name: ClassVar[str]
    #: `config.model_type` values this spec handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Model class names this spec handles (checked when the model type is unknown).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Config key holding each layer-shape field (`num_heads`, `num_kv_heads`, `head_dim`, `mlp_width`).
    config_keys: ClassVar[dict[str, str]] = {}
    #: Expression, in the generated modeling file, that builds decoder layer `index` from its
    #: own config `config.per_layer_config[index]` (`layer` is the stock-built layer).
    layer_factory: ClassVar[str] = "type(layer)(config.per_layer_config[index], index)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this spec describes `model`, judged from its config and class, never a hub name."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) in cls.model_types:
            return cls.structure_matches(model)
        return type(model).__name__ in cls.architectures and cls.structure_matches(model)

    @classmethod
    def structure_matches(cls, model: nn.Module) -> bool:
        """Whether the module structure is the one this spec expects (checked after the name)."""
        return True

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers, in order."""

    @abstractmethod
    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        """The current shape of `layer`, read from its modules (not from the config)."""

    @abstractmethod
    def attention_projections(self, shape: AttentionShape) -> list[Projection]:
        """The attention projections of a layer of this shape, with the owner of each block."""

    @abstractmethod
    def mlp_projections(self, width: int) -> list[Projection]:
        """The MLP projections of a layer with `width` channels."""

    @abstractmethod
    def rewrite_attention(self, layer: nn.Module, shape: AttentionShape, kept_heads: Sequence[int]) -> None:
        """Rewrite the attention module's shape attributes after its projections were sliced.

        `kept_heads` are the original indices of the remaining query heads, for families whose
        heads carry state of their own (ALiBi slopes).
        """

    def rewrite_mlp(self, layer: nn.Module, width: int) -> None:
        """Rewrite the MLP module's shape attributes after slicing (most MLPs keep none)."""
