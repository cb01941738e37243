"""Baichuan-7B family (remote code): fused `W_pack` = [q; k; v] stacked, multi-head, RoPE, RMSNorm, SwiGLU.

Matched by `model_type` "baichuan" or the class name BaiChuanForCausalLM, and the module tree,
never by importing its code: the spec works on the checkpoint's own remote code unchanged.
Baichuan derives `head_dim` from `hidden_size` and its attention sizes q/k/v by its own
`hidden_size` attribute, so slicing sets that to the heads' width (see `DerivedHeadDimSpec`).
Only MLP pruning reloads with the family's own code; with heads pruned, the generated modeling
file subclasses the remote classes (imported from the files saved beside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import (
    AttentionShape,
    DerivedHeadDimSpec,
    LayerShape,
    Projection,
    kv_owners,
    query_owners,
    resize_linears,
)
from .llama import LlamaSpec


def set_baichuan_heads(attention: nn.Module, heads: int) -> None:
    """Make a Baichuan attention compute with `heads` heads (its forward reads both attributes)."""
    attention.num_heads = heads
    attention.hidden_size = heads * attention.head_dim


def reshape_baichuan_layer(layer: nn.Module, config: Any) -> nn.Module:
    """Give a stock-built Baichuan decoder layer the shapes of its layer config (generated modeling file)."""
    hidden, inner, width = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    resize_linears(layer, {"self_attn.W_pack": (hidden, 3 * inner), "self_attn.o_proj": (inner, hidden),
                           "mlp.gate_proj": (hidden, width), "mlp.up_proj": (hidden, width),
                           "mlp.down_proj": (width, hidden)})
    set_baichuan_heads(layer.self_attn, config.num_attention_heads)
    return layer


class BaichuanSpec(DerivedHeadDimSpec):
    name = "baichuan"
    model_types = ("baichuan",)
    architectures = ("BaiChuanForCausalLM",)
    config_keys = {"num_heads": "num_attention_heads", "head_dim": "head_dim", "mlp_width": "intermediate_size"}
    layers_path = "model.layers"
    # Rotary positions: the ALiBi variants (Baichuan-13B) derive their slopes from the head count
    # in the model, which this spec does not rewrite; they are refused rather than mis-sliced.
    layer_modules = ("self_attn.W_pack", "self_attn.rotary_emb", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj")
    layer_factory = "reshape_baichuan_layer(layer, config.per_layer_config[index])"
    modeling_code = (resize_linears, set_baichuan_heads, reshape_baichuan_layer)
    stock_build_config = "{'num_attention_heads': config.hidden_size // config.head_dim}"

    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        attn = layer.self_attn
        heads = attn.W_pack.out_features // (3 * attn.head_dim)
        return LayerShape(AttentionShape(heads, heads, attn.head_dim), layer.mlp.gate_proj.out_features)

    def attention_projections(self, shape: AttentionShape) -> list[Projection]:
        q, kv, d = query_owners(shape), kv_owners(shape), shape.head_dim
        return [
            Projection("self_attn.W_pack", "out", q + kv + kv, d),  # [q heads; k heads; v heads]
            Projection("self_attn.o_proj", "in", q, d),
        ]

    # Llama's MLP: `gate_proj`, `up_proj`, `down_proj` under `mlp`.
    mlp_projections = LlamaSpec.mlp_projections

    def rewrite_attention(self, layer: nn.Module, shape: AttentionShape, kept_heads: Sequence[int]) -> None:
        set_baichuan_heads(layer.self_attn, shape.num_heads)
