"""Running a model one decoder layer at a time, as layer-wise pruners do.

`layer_inputs` runs the model's own forward up to its first decoder layer and keeps, per batch,
the hidden states entering it and the arguments the model passes to its layers (positions,
masks, rotary embeddings: the same for every layer). `forward_layer` then runs any decoder layer on
them. No family knowledge: whatever the model computes before its layers, it computes itself.
"""

from __future__ import annotations

import torch
from torch import nn

#: Per batch: the positional arguments after the hidden states, and the keyword arguments.
LayerArguments = tuple[tuple, dict]


class Stop(Exception):
    """Raised by a capturing hook once it has what it needs: the rest of the forward is not run."""


def layer_inputs(model: nn.Module, first_layer: nn.Module,
                 batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[LayerArguments]]:
    """The hidden states entering `first_layer` for each batch, and the arguments the model passes to it."""
    hidden, captured = [], []

    def hook(_module, args, kwargs):
        hidden.append(args[0] if args else kwargs["hidden_states"])
        captured.append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise Stop

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    return hidden, captured


def forward_layer(layer: nn.Module, hidden: torch.Tensor, arguments: LayerArguments) -> torch.Tensor:
    """The decoder layer's output hidden states (whatever its return type in this transformers release)."""
    rest, kwargs = arguments
    output = layer(hidden, *rest, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def returns_tuple(layer: nn.Module, hidden: torch.Tensor, arguments: LayerArguments) -> bool:
    """Whether the decoder layer returns a tuple (older and remote-code layers) or the hidden states."""
    rest, kwargs = arguments
    return isinstance(layer(hidden, *rest, **kwargs), tuple)


def forward_until_stopped(layer: nn.Module, hidden: torch.Tensor, arguments: LayerArguments) -> None:
    """Run the layer until a hook raises `Stop` (or to its end)."""
    try:
        forward_layer(layer, hidden, arguments)
    except Stop:
        pass
