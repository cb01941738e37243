"""Applying a plan to a model larger than memory: slice one layer at a time, write one shard per layer.

Each decoder layer is loaded from the checkpoint, sliced by the in-memory applier (`slice_model`
with a plan that touches only this layer), written as its own safetensors shard and sent back to
the meta device; the tensors outside the layers go into a first shard. The index, the config (its
per-layer shapes synced as after an in-memory slice) and the generated modeling file follow, so
`from_pretrained` loads the result as it loads an in-memory prune's. The caller gives the folder
(an atomic temporary one: a failure leaves nothing half-written behind).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..apply.slicing import slice_model
from ..export.config import sync_config
from ..plan import LayerPlan, Plan
from ..scoring.cache import fingerprint
from ..units.table import UnitTable
from .checkpoint import INDEX, CheckpointWeights


def write_streamed(model: nn.Module, table: UnitTable, plan: Plan, weights: CheckpointWeights, folder: Path,
                   progress: bool = True) -> int:
    """Slice `model` (on the meta device, its weights in `weights`) by `plan` into `folder`.

    `table` is the unit table of the unpruned model; returns the bytes of tensors written.
    """
    spec = table.spec
    layer_paths = [layer.path for layer in table]
    shards = len(layer_paths) + 1
    weight_map: dict[str, str] = {}
    written = 0

    def write(tensors: dict[str, torch.Tensor], number: int) -> None:
        nonlocal written
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / name, metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            written += value.numel() * value.element_size()

    with torch.no_grad():
        outside = weights.load_outside(model, layer_paths)
        try:  # the checkpoint's own names: a tied head is not written twice
            write({name: _tensor(model, name) for name in outside if name in weights.files}, 1)
        finally:
            weights.release_outside(model, outside)
        for number, layer_units in enumerate(tqdm(list(table), desc="slicing and writing", unit="layer",
                                                  disable=not progress), start=2):
            with weights.resident(model, layer_units.path) as layer:
                current = UnitTable(model, spec)  # earlier layers are sliced already: their shapes changed
                only = dataclasses.replace(
                    plan, model=fingerprint(model, current),
                    layers=[layer_plan if layer_plan.index == layer_units.index else LayerPlan(index=layer_plan.index)
                            for layer_plan in plan.layers],
                    compensation=[entry for entry in plan.compensation
                                  if entry["projection"].startswith(f"{layer_units.path}.")])
                slice_model(only, model, current)
                write({f"{layer_units.path}.{name}": value for name, value in layer.state_dict().items()}, number)
    sync_config(model, spec, plan.pruned_shapes())
    # The config, the generation config and the generated modeling file, as save_pretrained writes them
    # (in a folder of their own: save_pretrained deletes weight shards it did not write).
    side = folder / ".config"
    model.save_pretrained(side, state_dict={}, safe_serialization=True)
    for file in side.iterdir():
        if file.name not in ("model.safetensors", INDEX):
            file.rename(folder / file.name)
    shutil.rmtree(side)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map},
                                           indent=2, sort_keys=True))
    return written


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name).detach()
    except AttributeError:
        return model.get_buffer(name)
