"""The stand-in for an attention or MLP block that pruning removed whole.

Self-contained on purpose (it uses only `nn`): `adaprune.export` copies the source of
`RemovedBlock` and `remove_block` into the generated modeling file, so a reloaded checkpoint runs
the very code the sliced model ran in memory, with no adaprune installed.
"""

from __future__ import annotations

from torch import nn


class RemovedBlock(nn.Module):
    """Stands in for a removed block: it adds nothing to the residual stream.

    It returns zeros shaped like its input; with `outputs` > 1, a tuple of the zeros and Nones, as
    the block it replaces did. An attention stand-in is given its `layer_idx`: it then appends
    placeholder keys and values to the KV cache, so that the cached length stays right (the
    model reads it from layer 0 to place new tokens during generation). One head of width one:
    a cache layer holding no elements at all reports length 0.
    """

    removed_block = True  # how ArchSpec.is_removed recognises a stand-in, here or in a reloaded model

    def __init__(self, outputs: int = 1, layer_idx: int | None = None):
        super().__init__()
        self.outputs = outputs
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if self.layer_idx is not None:
            names = ("cache", "past_key_values", "past_key_value")  # the name changed across transformers releases
            cache = next((kwargs[name] for name in names if kwargs.get(name) is not None), None)
            if cache is not None:
                placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
                cache.update(placeholder, placeholder, self.layer_idx)
        zeros = hidden_states.new_zeros(hidden_states.shape)
        return zeros if self.outputs == 1 else (zeros,) + (None,) * (self.outputs - 1)

    def extra_repr(self) -> str:
        return f"outputs={self.outputs}, layer_idx={self.layer_idx}"


def remove_block(layer: nn.Module, path: str, outputs: int, layer_idx: int | None = None) -> None:
    """Replace the block at `path` inside the decoder `layer` by a `RemovedBlock`."""
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, name, RemovedBlock(outputs, layer_idx))
