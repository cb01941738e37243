"""Llama family: LLaMA-1/2 and Vicuna (multi-head), Llama-3, TinyLlama, SmolLM2 (grouped-query)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..vocabulary import BlockKind

from .base import (
    ArchSpec,
    AttentionShape,
    Block,
    LayerShape,
    Projection,
    channel_owners,
    kv_owners,
    query_owners,
)


class LlamaSpec(ArchSpec):
    name = "llama"
    model_types = ("llama",)
    architectures = ("LlamaForCausalLM",)
    config_keys = {
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "mlp_width": "intermediate_size",
    }
    layers_path = "model.layers"
    layer_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    # The decoder layer adds each block's output to the residual; attention returns (output, weights).
    attention_block = Block("self_attn", outputs=2, caches=True)
    mlp_block = Block("mlp")
    gguf_arch = "llama"  # Mistral too: llama.cpp runs Mistral checkpoints as "llama"
    bias_switches = {BlockKind.ATTENTION: "attention_bias", BlockKind.MLP: "mlp_bias"}

    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        attention = AttentionShape(0, 0, 0)  # a removed block: see ArchSpec.is_removed
        if not self.is_removed(layer, BlockKind.ATTENTION):
            attn = layer.self_attn
            head_dim = attn.head_dim
            attention = AttentionShape(
                num_heads=attn.q_proj.out_features // head_dim,
                num_kv_heads=attn.k_proj.out_features // head_dim,
                head_dim=head_dim,
            )
        mlp_width = 0 if self.is_removed(layer, BlockKind.MLP) else layer.mlp.gate_proj.out_features
        return LayerShape(attention=attention, mlp_width=mlp_width)

    def attention_projections(self, shape: AttentionShape) -> list[Projection]:
        q, kv, d = query_owners(shape), kv_owners(shape), shape.head_dim
        return [
            Projection("self_attn.q_proj", "out", q, d),
            Projection("self_attn.k_proj", "out", kv, d),
            Projection("self_attn.v_proj", "out", kv, d),
            Projection("self_attn.o_proj", "in", q, d),
        ]

    def mlp_projections(self, width: int) -> list[Projection]:
        ch = channel_owners(width)
        return [
            Projection("mlp.gate_proj", "out", ch),
            Projection("mlp.up_proj", "out", ch),
            Projection("mlp.down_proj", "in", ch),
        ]

    def rewrite_attention(self, layer: nn.Module, shape: AttentionShape, kept_heads: Sequence[int]) -> None:
        attn = layer.self_attn
        attn.num_key_value_groups = shape.heads_per_group
        # Older transformers releases kept these on the module; keep them true where present.
        for attribute, value in (("num_heads", shape.num_heads), ("num_key_value_heads", shape.num_kv_heads)):
            if hasattr(attn, attribute):
                setattr(attn, attribute, value)

    def rewrite_mlp(self, layer: nn.Module, width: int) -> None:
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = width
