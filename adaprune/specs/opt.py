"""OPT family: multi-head attention with biases, LayerNorm, ReLU `fc1`/`fc2` directly in the decoder layer.

OPT derives `head_dim` from `hidden_size` (see `DerivedHeadDimSpec`); its learned positions and
optional `project_in`/`project_out` sit outside the decoder layers and are not pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import (
    AttentionShape,
    DerivedHeadDimSpec,
    LayerShape,
    Projection,
    channel_owners,
    kv_owners,
    query_owners,
    resize_linears,
)


def reshape_opt_layer(layer: nn.Module, config) -> nn.Module:
    """Give a stock-built OPT decoder layer the shapes of its layer config (generated modeling file)."""
    hidden, inner, width = config.hidden_size, config.num_attention_heads * config.head_dim, config.ffn_dim
    resize_linears(layer, {"self_attn.q_proj": (hidden, inner), "self_attn.k_proj": (hidden, inner),
                           "self_attn.v_proj": (hidden, inner), "self_attn.out_proj": (inner, hidden),
                           "fc1": (hidden, width), "fc2": (width, hidden)})
    layer.self_attn.num_heads = config.num_attention_heads
    return layer


class OPTSpec(DerivedHeadDimSpec):
    name = "opt"
    model_types = ("opt",)
    architectures = ("OPTForCausalLM",)
    config_keys = {"num_heads": "num_attention_heads", "head_dim": "head_dim", "mlp_width": "ffn_dim"}
    layers_path = "model.decoder.layers"
    layer_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")
    layer_factory = "reshape_opt_layer(layer, config.per_layer_config[index])"
    modeling_code = (resize_linears, reshape_opt_layer)
    stock_build_config = "{'num_attention_heads': config.hidden_size // config.head_dim}"

    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        return LayerShape(AttentionShape(heads, heads, attn.head_dim), layer.fc1.out_features)

    def attention_projections(self, shape: AttentionShape) -> list[Projection]:
        # Multi-head: KV group g is head g; its k/v rows belong to the group, its q rows to the head.
        q, kv, d = query_owners(shape), kv_owners(shape), shape.head_dim
        return [
            Projection("self_attn.q_proj", "out", q, d),
            Projection("self_attn.k_proj", "out", kv, d),
            Projection("self_attn.v_proj", "out", kv, d),
            Projection("self_attn.out_proj", "in", q, d),
        ]

    def mlp_projections(self, width: int) -> list[Projection]:
        ch = channel_owners(width)
        return [Projection("fc1", "out", ch), Projection("fc2", "in", ch)]

    def rewrite_attention(self, layer: nn.Module, shape: AttentionShape, kept_heads: Sequence[int]) -> None:
        layer.self_attn.num_heads = shape.num_heads
