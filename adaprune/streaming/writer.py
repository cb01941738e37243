"""Applying a plan to a model larger than memory: slice one layer at a time, write one shard per layer.

Each decoder layer is loaded from the checkpoint, reconstructed where asked (the in-memory stage's
steps, on hidden states carried from layer to layer), sliced by the in-memory applier
(`slice_model` with a plan that touches only this layer), written as its own safetensors shard and sent back to
the meta device; the tensors outside the layers go into a first shard. The index, the config (its
per-layer shapes synced as after an in-memory slice) and the generated modeling file follow, so
`from_pretrained` loads the result as it loads an in-memory prune's. The caller gives the folder
(an atomic temporary one: a failure leaves nothing half-written behind).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..apply.mask import mask
from ..apply.slicing import slice_model
from ..export.config import sync_config
from ..plan import LayerPlan, Plan
from ..scoring.cache import fingerprint
from ..stages.reconstruct import ReconstructStage, projections_by_layer
from ..units.model_state import frozen
from ..units.table import UnitTable
from .checkpoint import INDEX, CheckpointWeights


def write_streamed(model: nn.Module, table: UnitTable, plan: Plan, weights: CheckpointWeights, folder: Path,
                   reconstruct: ReconstructStage | None = None, calibration: Sequence[torch.Tensor] = (),
                   progress: bool = True) -> dict[str, Any] | None:
    """Slice `model` (on the meta device, its weights in `weights`) by `plan` into `folder`.

    `table` is the unit table of the unpruned model. With `reconstruct`, each layer is masked and
    refitted on the `calibration` hidden states carried through the layers already refitted (as the
    in-memory stage does, one layer resident), then sliced; returns the stage's report (or None).
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

    report, state = None, None
    with torch.no_grad(), frozen(model):
        outside = weights.load_outside(model, layer_paths)
        try:  # the checkpoint's own names: a tied head is not written twice
            write({name: _tensor(model, name) for name in outside if name in weights.files}, 1)
            batches = reconstruct.batches(list(calibration), torch.device("cpu")) if reconstruct else []
            if batches:
                report = reconstruct.new_report(batches, plan)
                state = reconstruct.start(model, spec.decoder_layers(model)[0], batches, plan)
            elif reconstruct is not None:
                report = {**reconstruct.options, "skipped": "no calibration batches: pass calibration to plan()"}
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
                if state is not None:  # as Pruner.apply: mask, refit, then slice what the mask zeroed
                    handle = mask(only, model, current)
                    try:
                        reconstruct.refit_layer(layer, current.layers[layer_units.index], spec,
                                                projections_by_layer(only, current, model).get(layer_units.index, []),
                                                state, handle, report)
                    except BaseException:
                        handle.restore()  # the model is not left marked as masked
                        raise
                    handle.release()
                    slice_model(only, model, current, shift_biases=False)  # the mask added the bias shifts
                else:
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
    return report


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name).detach()
    except AttributeError:
        return model.get_buffer(name)
