"""Tiny random-initialised models of every supported family, for the shared property suite.

A family entry builds a model from a handful of drawn shape parameters. To add a family, add a
`Family` to FAMILIES; every property test runs on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# A small, faithful Baichuan-7B remote-code folder (configuration_baichuan.py, modeling_baichuan.py).
BAICHUAN_CODE = Path(__file__).parent / "baichuan_model"


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


def _common(shape: Shape) -> dict:
    """The config entries every Llama-like family names the same way."""
    return dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.width,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=64)


def _mistral(shape: Shape) -> PreTrainedModel:
    # A window shorter than the test sequences, so that sliding-window attention is exercised.
    return MistralForCausalLM(MistralConfig(**_common(shape), num_key_value_heads=shape.kv_heads,
                                            head_dim=shape.head_dim, sliding_window=4))


def _qwen2(shape: Shape) -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(**_common(shape), num_key_value_heads=shape.kv_heads))


def _phi3(shape: Shape) -> PreTrainedModel:
    return Phi3ForCausalLM(Phi3Config(**_common(shape), num_key_value_heads=shape.kv_heads,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _opt(shape: Shape) -> PreTrainedModel:
    return OPTForCausalLM(OPTConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, ffn_dim=shape.width, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, max_position_embeddings=64, word_embed_proj_dim=shape.hidden))


def _bloom(shape: Shape) -> PreTrainedModel:
    # Bloom's MLP is always 4 * hidden_size wide: `shape.width` does not apply.
    return BloomForCausalLM(BloomConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, n_layer=shape.layers,
                                        n_head=shape.heads))


def _baichuan(shape: Shape) -> PreTrainedModel:
    # Loaded as a user loads Baichuan-7B: remote code through `auto_map`, trust_remote_code=True.
    config = AutoConfig.from_pretrained(BAICHUAN_CODE, trust_remote_code=True, **_common(shape))
    return AutoModelForCausalLM.from_config(config, trust_remote_code=True)


FAMILIES: list[Family] = [
    Family("llama", _llama),
    Family("llama-untied-biased", lambda s: _llama(s, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    Family("mistral", _mistral),
    Family("qwen2", _qwen2),
    Family("phi3", _phi3),
    Family("opt", _opt, grouped_query=False),
    Family("bloom", _bloom, grouped_query=False),
    Family("baichuan", _baichuan, grouped_query=False, trust_remote_code=True),
]


def build(family: Family, shape: Shape, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = family.build(shape)
    # The default init is tiny (std 0.02) and biases start at zero; larger values make any
    # mismatch between masked, sliced and reloaded models visible in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 or name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


def prune_by_hand(model: PreTrainedModel, **removals) -> PreTrainedModel:
    """Slice `model` by a hand-made plan: `removals` maps LayerPlan fields to one value per layer."""
    from adaprune import Pruner

    pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], allocation="global",
                    units=["kv_groups", "channels", "blocks"], progress=False)
    plan = pruner.plan()
    for field, per_layer in removals.items():
        for layer, value in zip(plan.layers, per_layer):
            setattr(layer, field, value)
    pruner.apply(plan, mode="slice")
    return model
