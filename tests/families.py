"""Tiny random-initialised models of every supported family, for the shared property suite.

A family entry builds a model from a handful of drawn shape parameters. To add a family, add a
`Family` to FAMILIES; every property test runs on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    heads_per_group: int
    head_dim: int
    width: int  # MLP channels
    vocab: int = 97

    @property
    def heads(self) -> int:
        return self.kv_heads * self.heads_per_group

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Shape], PreTrainedModel]
    grouped_query: bool = True  # whether KV heads may be shared by several query heads
    trust_remote_code: bool = False  # reload of even a uniform prune needs remote code


def _llama(shape: Shape, **extra) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=64, **extra)
    return LlamaForCausalLM(config)


FAMILIES: list[Family] = [
    Family("llama", _llama),
    Family("llama-untied-biased", lambda s: _llama(s, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
]


def build(family: Family, shape: Shape, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = family.build(shape)
    # The default init is tiny (std 0.02) and biases start at zero; larger values make any
    # mismatch between masked, sliced and reloaded models visible in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 or name.endswith("bias"):
                param.normal_(0, 0.2)
    return model.eval()
