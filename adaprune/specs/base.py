"""The architecture-spec interface: everything adaprune knows about one model family.

A spec answers, for one family, where the decoder layers are, which projections make up
attention and the MLP and how their rows and columns map to heads and channels, and which
module attributes and config keys describe those shapes. Nothing outside `adaprune.specs`
names a projection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from ..vocabulary import BlockKind, Level

Axis = Literal["out", "in"]
# Owner of one block of a projection: (Level.HEAD, h) for query head h, (Level.KV_GROUP, g) for
# KV group g, (Level.CHANNEL, c) for MLP channel c.
Owner = tuple[Level, int]


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
class Block:
    """A block of a decoder layer that pruning may remove whole: its attention or its MLP.

    Declare one (`ArchSpec.attention_block` / `mlp_block`) only where the decoder layer itself adds
    the block's output to the residual stream, so that a stand-in returning zeros leaves the
    residual intact, and where zeroing every parameter of the block makes it output zeros (true
    when it ends in a Linear). Bloom's blocks add the residual inside: it declares none.

    `path` is the module path inside the decoder layer; `outputs` is 1 when its forward returns a
    tensor, n when a tuple of n (the output first, the rest None); `caches` says it keeps a KV
    cache entry, which must keep its length when the block is gone (the model reads the cached
    length from layer 0 to place new tokens).
    """

    path: str
    outputs: int = 1
    caches: bool = False


@dataclass(frozen=True)
class AttentionShape:
    """Head counts of one attention block. `num_heads` query heads share `num_kv_heads` KV heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        # A removed attention block has the shape (0, 0, 0): no groups, no heads per group.
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass(frozen=True)
class LayerShape:
    """The prunable shape of one decoder layer."""

    attention: AttentionShape
    mlp_width: int

    def removed_blocks(self) -> tuple[BlockKind, ...]:
        """The blocks this layer no longer has: 0 heads means no attention, 0 channels no MLP."""
        return tuple(kind for kind, size in ((BlockKind.ATTENTION, self.attention.num_heads),
                                             (BlockKind.MLP, self.mlp_width)) if size == 0)

    def to_dict(self) -> dict[str, int]:
        return {
            "num_heads": self.attention.num_heads,
            "num_kv_heads": self.attention.num_kv_heads,
            "head_dim": self.attention.head_dim,
            "mlp_width": self.mlp_width,
        }


def query_owners(shape: AttentionShape) -> tuple[Owner, ...]:
    return tuple((Level.HEAD, h) for h in range(shape.num_heads))


def kv_owners(shape: AttentionShape) -> tuple[Owner, ...]:
    return tuple((Level.KV_GROUP, g) for g in range(shape.num_kv_heads))


def channel_owners(width: int) -> tuple[Owner, ...]:
    return tuple((Level.CHANNEL, c) for c in range(width))


def stock_class(cls: type) -> type:
    while cls.__module__.rpartition(".")[2].startswith("modeling_adapruned_"):
        cls = cls.__bases__[0]
    return cls


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def resize_linears(layer: nn.Module, sizes: Mapping[str, tuple[int, int]]) -> None:
    """Replace Linears of `layer` by new ones of `(in_features, out_features)`, with a bias where the old had one.

    For the layer factories of generated modeling files (see `ArchSpec.modeling_code`): the new
    weights are uninitialised, the checkpoint fills them. Self-contained, as copied code must be.
    """
    for path, (in_features, out_features) in sizes.items():
        parent_path, _, name = path.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        bias = getattr(parent, name).bias is not None
        setattr(parent, name, nn.Linear(in_features, out_features, bias=bias))


class ArchSpec(ABC):
    """Abstract description of one decoder-only model family.

    Subclasses are small: a few class attributes and the methods below. A package registers a
    new one through the ``adaprune.specs`` entry-point group (see `adaprune.hookspecs`), or a
    script with `adaprune.specs.register_spec`; see docs/adding-a-family.md.
    """

    #: Short family name used in plans and reports.
    name: ClassVar[str]
    #: `config.model_type` values this spec handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Model class names this spec handles (checked when the model type is unknown).
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Config key holding each layer-shape field (`num_heads`, `num_kv_heads`, `head_dim`, `mlp_width`).
    config_keys: ClassVar[dict[str, str]] = {}
    #: Path from the model to its list of decoder layers, e.g. `"model.layers"`.
    layers_path: ClassVar[str]
    #: Modules every decoder layer has (paths inside the layer): a model that lacks one is refused.
    layer_modules: ClassVar[tuple[str, ...]] = ()
    #: Expression, in the generated modeling file, that builds decoder layer `index` from its
    #: own config `config.per_layer_config[index]` (`layer` is the stock-built layer).
    layer_factory: ClassVar[str] = "type(layer)(config.per_layer_config[index], index)"
    #: Functions whose source is copied into the generated modeling file, for a `layer_factory`
    #: that calls them: the reloaded model then runs the very code that rewrote the sliced one in
    #: memory. They may use only `nn` (torch.nn) and each other, as the file imports no adaprune.
    modeling_code: ClassVar[tuple[Callable[..., Any], ...]] = ()
    #: Python expression over `config`: config values under which the stock classes can build the
    #: model in the generated modeling file, before `layer_factory` gives each layer its own shape.
    #: Families that derive `head_dim` from `hidden_size` build at the unpruned head count there.
    stock_build_config: ClassVar[str] = "{}"
    #: The blocks that may be removed whole (see `Block`); None: this family cannot drop that block.
    attention_block: ClassVar[Block | None] = None
    mlp_block: ClassVar[Block | None] = None
    #: llama.cpp's architecture name for this family (`general.architecture` of a GGUF file), for
    #: `adaprune.export.gguf.export_gguf`; None: llama.cpp runs no model of this family, export refuses it.
    gguf_arch: ClassVar[str | None] = None
    #: Config keys that give every projection of a block a bias (Llama's `attention_bias`,
    #: `mlp_bias`): a stage that needs a bias the model lacks may add zero biases to the whole
    #: block in every layer and set the key, which the stock config then describes.
    bias_switches: ClassVar[dict[BlockKind, str]] = {}

    def removable_blocks(self) -> dict[BlockKind, Block]:
        """The blocks this family can remove whole, by kind."""
        blocks = {BlockKind.ATTENTION: self.attention_block, BlockKind.MLP: self.mlp_block}
        return {kind: block for kind, block in blocks.items() if block is not None}

    def is_removed(self, layer: nn.Module, kind: BlockKind) -> bool:
        """Whether the `kind` block of `layer` was removed (replaced by a stand-in that outputs zeros).

        `layer_shape` reports a removed attention block as 0 heads, a removed MLP as 0 channels.
        """
        block = self.removable_blocks().get(kind)
        return block is not None and bool(getattr(layer.get_submodule(block.path), "removed_block", False))

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this spec describes `model`, judged from its config and class, never a hub name."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) in cls.model_types:
            return cls.structure_matches(model)
        return type(model).__name__ in cls.architectures and cls.structure_matches(model)

    @classmethod
    def structure_matches(cls, model: nn.Module) -> bool:
        """Whether the module structure is the one this spec expects (checked after the name):
        the decoder layers sit at `layers_path` and have the `layer_modules`."""
        try:
            layers = model.get_submodule(cls.layers_path)
        except AttributeError:
            return False
        if not layers:
            return False
        names = set()
        for layer in layers:
            for name, module in layer.named_modules():
                names.add(name)
                # A layer may have lost a whole block to pruning: the stand-in stands for its modules.
                if getattr(module, "removed_block", False):
                    names.update(path for path in cls.layer_modules if path.startswith(f"{name}."))
        return all(path in names for path in cls.layer_modules)

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers, in order."""
        return model.get_submodule(self.layers_path)

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

    def stock_builds(self, config: Any, shape: LayerShape) -> bool:
        """Whether the stock modeling code builds a layer of `shape` from `config` (its keys rewritten).

        False sends the checkpoint through the generated modeling file even when every layer has
        the same shape: families whose code derives `head_dim` from `hidden_size` say False once
        heads are gone.
        """
        return True

    def layer_config(self, layer: nn.Module) -> dict[str, Any]:
        """Extra per-layer config entries (JSON values) that the generated modeling file needs.

        Bloom records here the original index of each head a layer keeps, for its ALiBi slope.
        """
        return {}


class DerivedHeadDimSpec(ArchSpec):
    """Base of families whose code derives `head_dim = hidden_size // heads` (OPT, Bloom, Baichuan).

    Their stock code cannot build a layer that lost heads, even when every layer lost the same
    number, so such a checkpoint goes through the generated modeling file: the stock classes build
    the model at the unpruned head count (`stock_build_config`), then the spec's own reshaping
    function, copied into the file (`modeling_code`), gives each layer the shapes of its config.
    The config records `head_dim` explicitly.
    """

    def stock_builds(self, config: Any, shape: LayerShape) -> bool:
        return shape.attention.num_heads * shape.attention.head_dim == config.hidden_size
