"""The whole model runnable forward and backward with its decoder layers left on disk (accelerate's offload).

A stage that trains through the whole model at every step (the adaptive fusion) cannot be cut into
one forward and one backward sweep the way scoring is. `disk_offloaded` gives it the model itself:
the weights outside the decoder layers (embeddings, final norm, head) are loaded, and each decoder
layer gets accelerate's offload hook (`AlignDevicesHook` with ``offload=True``), which reads the
layer's tensors from the checkpoint's safetensors files for its forward and puts them back on the
meta device after it. Each layer's forward is also checkpointed (`torch.utils.checkpoint`): the
forward pass keeps only the layer's input, and the backward pass runs the layer again, its weights
read again, to backpropagate through it. So one layer's weights are resident at a time, in the
forward and in the backward pass, slower (every layer is read twice per training step) but bounded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .checkpoint import CheckpointWeights, return_freed_memory


@contextmanager
def disk_offloaded(model: nn.Module, weights: CheckpointWeights, layer_paths: Sequence[str]) -> Iterator[nn.Module]:
    """`model` (its weights on the meta device) made runnable for the block, its decoder layers read from disk.

    Afterwards the model is as it was: hooks removed, every weight on the meta device again.
    """
    # accelerate's loader reads tensors straight from the safetensors files; its hook casts each to the
    # dtype of the model's own (meta) tensor, as CheckpointWeights does.
    loader = OffloadedWeightsLoader(index={name: {"safetensors_file": str(file), "weight_name": name}
                                           for name, file in weights.files.items()})
    outside = weights.load_outside(model, layer_paths)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    hooked: list[tuple[nn.Module, bool]] = []  # each hooked layer, and whether it had its own forward before
    try:
        for path in layer_paths:
            layer = model.get_submodule(path)
            own_forward = "forward" in vars(layer)
            # Buffers too: a layer's persistent buffers (Baichuan's rotary frequencies) are in the checkpoint.
            hook = AlignDevicesHook(execution_device=device, offload=True, offload_buffers=True, io_same_device=False,
                                    weights_map=PrefixedDataset(loader, f"{path}."), place_submodules=True)
            add_hook_to_module(layer, hook)
            hooked.append((layer, own_forward))
            layer.forward = functools.partial(_checkpointed, layer.forward)
        yield model
    finally:
        for layer, own_forward in hooked:
            layer.forward = layer.forward.args[0]  # the hook's forward, then the layer's own
            remove_hook_from_module(layer)
            if not own_forward:
                del layer.forward  # the class's forward again, as before
        weights.release_outside(model, outside)
        return_freed_memory()


def _checkpointed(forward, *args, **kwargs):
    """The layer's forward without keeping its activations for the backward pass (run again there).

    Without gradients there is nothing to keep: the forward runs as it is. Early stop is off so
    that the rerun goes to the end of the forward, where the offload hook releases the weights.
    """
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    with set_checkpoint_early_stop(False):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
