"""A model whose weights stay in its safetensors files until a stage needs them.

`empty_model(folder)` builds the model on the meta device (accelerate's `init_empty_weights`: no
weight memory); `CheckpointWeights(folder)` then loads the tensors of one module at a time from the
checkpoint's files (one file or a sharded index) and puts them back on the meta device afterwards.
Buffers the model computes itself (rotary frequencies) stay real throughout.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn

from ..errors import ConfigurationError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def empty_model(folder: str | os.PathLike[str], trust_remote_code: bool = False,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """The checkpoint's causal LM with every weight on the meta device (its config read, nothing loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # init_empty_weights allocates each parameter (untouched) before moving it to the meta device.
    # With glibc's default, rising mmap threshold those blocks came from the heap, and a small
    # allocation after each kept the heap from shrinking: gigabytes of free heap, which later served
    # the streamed passes' activations, resident until trimmed (the scoring's peak varied by ~55 MiB
    # from run to run with it). Mapped on their own, they go back to the system when freed.
    large_allocations_mapped()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    model.eval()
    return model


class CheckpointWeights:
    """Where each tensor of a safetensors checkpoint lies, and loading them module by module."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}
        else:
            raise ConfigurationError(
                f"{self.folder} holds no safetensors weights ({SINGLE} or {INDEX}): offloading streams layers from "
                "safetensors files. Save the model with model.save_pretrained(folder) (safetensors is the default).")
        large_allocations_mapped()

    def load(self, model: nn.Module, prefix: str) -> None:
        """Load every parameter and persistent buffer of the module at `prefix` ('' for all) from the files."""
        module = model.get_submodule(prefix) if prefix else model
        names = [f"{prefix}.{n}" if prefix else n for n in _tensor_names(module)]
        absent = [n for n in names if n not in self.files]
        if absent:
            raise ConfigurationError(f"The checkpoint in {self.folder} holds no {absent[0]}; it is "
                                     "incomplete or for another model.")
        self._read(model, names)

    def load_outside(self, model: nn.Module, layer_paths: Sequence[str]) -> list[str]:
        """Load every tensor outside the decoder layers (embeddings, final norm, head); returns their names.

        Weights the checkpoint leaves out because the config ties them (the head to the embeddings)
        are tied again once loaded.
        """
        inside = tuple(f"{path}." for path in layer_paths)
        outside = [n for n in _tensor_names(model) if not n.startswith(inside)]
        self._read(model, [n for n in outside if n in self.files])
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        missing = [n for n, p in model.named_parameters() if n in outside and p.is_meta]
        if missing:
            raise ConfigurationError(f"The checkpoint in {self.folder} holds no {missing[0]} (nor {len(missing) - 1} "
                                     "other weights outside the decoder layers); it is incomplete or for another model.")
        return outside

    def _read(self, model: nn.Module, names: Sequence[str]) -> None:
        """Put each named tensor's values from the checkpoint into `model`, one file open at a time."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for name in file_names:
                    set_module_tensor_to_device(model, name, "cpu", value=handle.get_tensor(name))

    @staticmethod
    def release_outside(model: nn.Module, names: Sequence[str]) -> None:
        """Back to the meta device: the tensors `load_outside` loaded."""
        for name in names:
            set_module_tensor_to_device(model, name, "meta")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # the head shares the embedding again, on the meta device
        return_freed_memory()

    @staticmethod
    def release(module: nn.Module) -> None:
        """Back to the meta device: the module's weights leave memory."""
        module.to("meta")
        return_freed_memory()

    @contextmanager
    def resident(self, model: nn.Module, prefix: str) -> Iterator[nn.Module]:
        """The module at `prefix` with its weights loaded for the duration of the block."""
        self.load(model, prefix)
        module = model.get_submodule(prefix)
        try:
            yield module
        finally:
            self.release(module)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def large_allocations_mapped() -> None:
    """Have glibc map every allocation above 128 KiB on its own (mallopt M_MMAP_THRESHOLD), so that a
    freed tensor goes back to the system at once, whatever the heap around it holds.

    By default glibc raises that threshold each time a mapped block is freed (up to 32 MiB), after
    which a streamed layer's tensors come from the heap, and a heap fragmented by many of them keeps
    its pages. At 1 MiB the activations of a layer's passes between 128 KiB and 1 MiB (per-head and
    key/value tensors) still grew the heap by about 100 MiB per layer of a 1B model; at 128 KiB by
    about 17 MiB. Process-wide; set once offload is asked for.
    """
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 128 << 10)


def return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim), where there is glibc.

    A layer's tensors (tens of MiB each) come from the heap once glibc has raised its mmap
    threshold, and freed heap pages stay in the process: without this, resident memory grows by a
    layer per layer streamed, as if nothing were released.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def _tensor_names(module: nn.Module) -> list[str]:
    """The module's parameters and persistent buffers, as its state dict names them."""
    return [n for n, _ in module.named_parameters()] + [n for n, _ in _persistent_buffers(module)]


def _persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in (module.get_submodule(owner) if owner else module)._non_persistent_buffers_set:
            yield name, buffer
