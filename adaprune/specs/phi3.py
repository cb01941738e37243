"""Phi-3 family: fused `qkv_proj` = [q; k; v] stacked (grouped-query), fused `gate_up_proj` = [gate; up].

Phi-3's attention reads the head count from its config in `forward`, so every sliced layer gets
a config of its own, as transformers gives the layers of a heterogeneous model. Phi-3's config
check of its (longrope) rotary factors derives `head_dim` from the head count: the generated
modeling file runs it at the unpruned count (`stock_build_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from .base import (
    ArchSpec,
    AttentionShape,
    LayerShape,
    Projection,
    channel_owners,
    kv_owners,
    query_owners,
)
from .llama import LlamaSpec


class Phi3Spec(ArchSpec):
    name = "phi3"
    model_types = ("phi3",)
    architectures = ("Phi3ForCausalLM",)
    config_keys = LlamaSpec.config_keys  # the same key names
    layers_path = "model.layers"
    layer_modules = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    stock_build_config = "{'num_attention_heads': config.hidden_size // config.head_dim}"

    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        attn = layer.self_attn
        heads = attn.o_proj.in_features // attn.head_dim
        kv_heads = (attn.qkv_proj.out_features // attn.head_dim - heads) // 2
        return LayerShape(AttentionShape(heads, kv_heads, attn.head_dim), layer.mlp.down_proj.in_features)

    def attention_projections(self, shape: AttentionShape) -> list[Projection]:
        q, kv, d = query_owners(shape), kv_owners(shape), shape.head_dim
        return [
            Projection("self_attn.qkv_proj", "out", q + kv + kv, d),  # [q heads; k heads; v heads]
            Projection("self_attn.o_proj", "in", q, d),
        ]

    def mlp_projections(self, width: int) -> list[Projection]:
        ch = channel_owners(width)
        return [
            Projection("mlp.gate_up_proj", "out", ch + ch),  # [gate; up], split by `chunk(2)`
            Projection("mlp.down_proj", "in", ch),
        ]

    def rewrite_attention(self, layer: nn.Module, shape: AttentionShape, kept_heads: Sequence[int]) -> None:
        attn = layer.self_attn
        config = copy.copy(attn.config)
        config.__dict__.pop("_heterogeneity_spec", None)  # a layer's config is homogeneous
        config.num_attention_heads, config.num_key_value_heads = shape.num_heads, shape.num_kv_heads
        attn.config = config
        attn.num_key_value_heads = shape.num_kv_heads
        attn.num_key_value_groups = shape.heads_per_group
