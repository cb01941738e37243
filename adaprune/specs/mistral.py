"""Mistral family: Llama's module structure, grouped-query attention, sliding-window attention.

The window is a config value that pruning leaves alone; nothing else differs from Llama.
"""

from __future__ import annotations

from .llama import LlamaSpec


class MistralSpec(LlamaSpec):
    name = "mistral"
    model_types = ("mistral",)
    architectures = ("MistralForCausalLM",)
    bias_switches = {}  # its biases are fixed by the modeling code, not switched by the config
