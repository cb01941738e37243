"""Qwen2 family: Llama's module structure, grouped-query attention, biases on q/k/v, untied lm_head.

The graph slices the q/k/v biases with their rows. Qwen2's config has no `head_dim` key (the
code derives it from `hidden_size`, but reads an explicit one first), so a pruned config records it.
"""

from __future__ import annotations

from .llama import LlamaSpec


class Qwen2Spec(LlamaSpec):
    name = "qwen2"
    model_types = ("qwen2",)
    architectures = ("Qwen2ForCausalLM",)
    gguf_arch = "qwen2"
    bias_switches = {}  # its biases are fixed by the modeling code, not switched by the config
