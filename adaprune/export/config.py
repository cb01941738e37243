"""Keep a sliced model's config true, so that `save_pretrained` writes a checkpoint that loads anywhere.

Same shapes in every layer, and shapes the stock config accepts: the global config keys are
rewritten and stock transformers reloads the checkpoint. Otherwise (shapes that differ per
layer, or a head count the stock config refuses, such as one that does not divide
`hidden_size`): the shapes go into `config.per_layer_config`, and the model and config classes
become thin subclasses of the stock ones, defined in a small generated modeling file that
`save_pretrained` copies next to the weights and registers through `auto_map`
(`from_pretrained(dir, trust_remote_code=True)`, no adaprune needed).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn

from ..specs.base import ArchSpec, LayerShape
from ..vocabulary import BlockKind
from .modeling import stock_class, use_generated_classes


def sync_config(model: nn.Module, spec: ArchSpec, shapes: Sequence[LayerShape]) -> None:
    """Write the per-layer `shapes` into `model.config` (and the model class, if they differ)."""
    config = model.config
    if getattr(config, "is_heterogeneous", False):
        config.per_layer_config = None
    entries = [_layer_entries(spec, shape, layer) for shape, layer in zip(shapes, spec.decoder_layers(model))]
    _mark_removed_blocks(spec, config, shapes, entries)
    # Entries hold lists (Bloom's kept heads): count them by their JSON text. `skip` is per layer only.
    common = json.loads(Counter(json.dumps({k: v for k, v in e.items() if k != "skip"}, sort_keys=True)
                                for e in entries).most_common(1)[0][0])
    for key, value in common.items():
        setattr(config, key, value)
    overrides = {
        index: {key: value for key, value in entry.items() if value != common.get(key)}
        for index, entry in enumerate(entries)
        if entry != common
    }
    if overrides:
        config.per_layer_config = overrides
    if overrides or not stock_config_accepts(config) or not all(spec.stock_builds(config, s) for s in shapes):
        use_generated_classes(model, spec)


def _layer_entries(spec: ArchSpec, shape: LayerShape, layer: nn.Module) -> dict:
    """One layer's config entries: its shape under the family's config keys, and the spec's extras."""
    fields = shape.to_dict()
    # A multi-head-only family has no key for KV heads: it equals the head count there.
    return {**{key: fields[field] for field, key in spec.config_keys.items()}, **spec.layer_config(layer)}


BLOCK_FIELDS = {BlockKind.ATTENTION: ("num_heads", "num_kv_heads", "head_dim"), BlockKind.MLP: ("mlp_width",)}


def _mark_removed_blocks(spec: ArchSpec, config, shapes: Sequence[LayerShape], entries: list[dict]) -> None:
    """List each layer's removed blocks under `skip`, the per-layer key transformers keeps for that.

    The generated modeling file builds such a layer at the usual size, then swaps in a stand-in for
    each skipped block; so a skipped block's keys take the value most layers keeping that block
    have (the config's own where none does), never the 0 heads the stock code cannot build.
    """
    for kind, fields in BLOCK_FIELDS.items():
        keys = [spec.config_keys[field] for field in fields if field in spec.config_keys]
        keeping = [entry for entry, shape in zip(entries, shapes) if kind not in shape.removed_blocks()]
        for key in keys:
            usual = Counter(entry[key] for entry in keeping).most_common(1)
            # No layer keeps the block: the config's value, or none (Qwen2 derives head_dim when unset).
            value = usual[0][0] if usual else getattr(config, key, None)
            for entry, shape in zip(entries, shapes):
                if kind in shape.removed_blocks():
                    entry[key] = value
                    if value is None:
                        del entry[key]
    for entry, shape in zip(entries, shapes):
        if shape.removed_blocks():
            entry["skip"] = [str(kind) for kind in shape.removed_blocks()]


def stock_config_accepts(config) -> bool:
    """Whether the stock config class validates these shapes (it refuses, say, 7 heads for hidden 64)."""
    try:
        stock_class(type(config)).validate(config)
    except (ValueError, TypeError, StrictDataclassClassValidationError):
        return False
    return True
