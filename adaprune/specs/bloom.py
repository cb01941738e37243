"""Bloom family: fused `query_key_value` interleaved per head, biases on every Linear, GELU MLP, ALiBi.

`query_key_value`'s output is viewed as (batch, seq, heads, 3, head_dim): head h owns one block
of 3 * head_dim rows, its q, then its k, then its v.

ALiBi slopes belong to the heads, but stock Bloom derives them from the head count, so after
pruning the remaining heads would silently get other slopes. Instead the model keeps building
the ALiBi tensor for its unpruned head count (`BloomModel.num_heads`, which slicing leaves
alone), and each pruned attention keeps only its own heads' rows of it (`select_alibi_heads`):
`alibi_heads` lists the original index of every head it kept, in the config too, per layer.
The generated modeling file runs this same code, so a reloaded model computes the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..vocabulary import Level

from .base import (
    AttentionShape,
    DerivedHeadDimSpec,
    LayerShape,
    Projection,
    channel_owners,
    query_owners,
    resize_linears,
)


def select_alibi_heads(attention: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a pruned Bloom attention: keep its own heads' rows of the model's ALiBi tensor."""
    alibi = kwargs["alibi"]  # [batch * unpruned heads, 1, keys]; BloomBlock passes it by keyword
    rows = alibi.view(args[0].shape[0], -1, *alibi.shape[1:])[:, attention.alibi_heads]
    return args, {**kwargs, "alibi": rows.flatten(0, 1)}


def set_bloom_heads(layer: nn.Module, alibi_heads: Sequence[int]) -> None:
    """Make a Bloom block compute with the heads of original indices `alibi_heads`, each with its own slope."""
    attn = layer.self_attention
    if not hasattr(attn, "alibi_heads"):
        attn.register_forward_pre_hook(select_alibi_heads, with_kwargs=True)
    attn.alibi_heads = list(alibi_heads)
    attn.num_heads = layer.num_heads = len(alibi_heads)
    # The width of the heads' output, as the `pretraining_tp > 1` slow_but_exact path reads it.
    attn.hidden_size = attn.split_size = attn.num_heads * attn.head_dim


def reshape_bloom_layer(layer: nn.Module, config: Any) -> nn.Module:
    """Give a stock-built Bloom block the shapes and heads of its layer config (generated modeling file)."""
    hidden, inner, width = config.hidden_size, config.n_head * config.head_dim, config.intermediate_size
    resize_linears(layer, {"self_attention.query_key_value": (hidden, 3 * inner),
                           "self_attention.dense": (inner, hidden),
                           "mlp.dense_h_to_4h": (hidden, width), "mlp.dense_4h_to_h": (width, hidden)})
    set_bloom_heads(layer, config.alibi_heads)
    return layer


class BloomSpec(DerivedHeadDimSpec):
    name = "bloom"
    model_types = ("bloom",)
    architectures = ("BloomForCausalLM",)
    # Stock Bloom has no keys for `head_dim` and the MLP width (4 * hidden_size): a pruned config adds them.
    config_keys = {"num_heads": "n_head", "head_dim": "head_dim", "mlp_width": "intermediate_size"}
    layers_path = "transformer.h"
    layer_modules = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")
    layer_factory = "reshape_bloom_layer(layer, config.per_layer_config[index])"
    modeling_code = (resize_linears, select_alibi_heads, set_bloom_heads, reshape_bloom_layer)
    stock_build_config = "{'n_head': config.hidden_size // config.head_dim}"

    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        attn = layer.self_attention
        heads = attn.query_key_value.out_features // (3 * attn.head_dim)
        return LayerShape(AttentionShape(heads, heads, attn.head_dim), layer.mlp.dense_h_to_4h.out_features)

    def attention_projections(self, shape: AttentionShape) -> list[Projection]:
        # Per head: its q block, then its k and v blocks (which belong to its KV group, the head itself).
        heads, d = range(shape.num_heads), shape.head_dim
        interleaved = tuple(owner for h in heads for owner in ((Level.HEAD, h), (Level.KV_GROUP, h), (Level.KV_GROUP, h)))
        return [
            Projection("self_attention.query_key_value", "out", interleaved, d),
            Projection("self_attention.dense", "in", query_owners(shape), d),
        ]

    def mlp_projections(self, width: int) -> list[Projection]:
        ch = channel_owners(width)
        return [Projection("mlp.dense_h_to_4h", "out", ch), Projection("mlp.dense_4h_to_h", "in", ch)]

    def rewrite_attention(self, layer: nn.Module, shape: AttentionShape, kept_heads: Sequence[int]) -> None:
        # `kept_heads` index the current heads; map them back to the original ones, for their slopes.
        current = getattr(layer.self_attention, "alibi_heads", None)
        set_bloom_heads(layer, [current[h] for h in kept_heads] if current is not None else kept_heads)

    def layer_config(self, layer: nn.Module) -> dict[str, Any]:
        attn = layer.self_attention
        return {"alibi_heads": list(getattr(attn, "alibi_heads", range(attn.num_heads)))}

    def stock_builds(self, config: Any, shape: LayerShape) -> bool:
        return super().stock_builds(config, shape) and shape.mlp_width == 4 * config.hidden_size
