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

import hashlib
import importlib.util
import inspect
import json
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn
from transformers.dynamic_module_utils import get_relative_import_files

from .blocks import RemovedBlock, remove_block
from .data import cache_dir
from .specs import ArchSpec, LayerShape


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


BLOCK_FIELDS = {"attention": ("num_heads", "num_kv_heads", "head_dim"), "mlp": ("mlp_width",)}


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
            entry["skip"] = list(shape.removed_blocks())


def stock_config_accepts(config) -> bool:
    """Whether the stock config class validates these shapes (it refuses, say, 7 heads for hidden 64)."""
    try:
        _stock_class(type(config)).validate(config)
    except (ValueError, TypeError, StrictDataclassClassValidationError):
        return False
    return True


def use_generated_classes(model: nn.Module, spec: ArchSpec) -> None:
    """Give `model` and its config the generated subclasses, registered for `auto_map`.

    Stock transformers classes are imported from `transformers`; a remote-code family's classes
    (Baichuan) from the family's own files, by a relative import: those files are copied next
    to the generated one, and `save_pretrained` copies them all into the checkpoint.
    """
    stock_model, stock_config = _stock_class(type(model)), _stock_class(type(model.config))
    names = {id(module): name for name, module in model.named_modules()}
    model_name, config_name = f"Adapruned{stock_model.__name__}", f"Adapruned{stock_config.__name__}"
    source = (
        resources.files("adaprune").joinpath("templates/modeling_heterogeneous.py.template").read_text()
        .replace("__MODEL_MODULE__", _import_source(stock_model))
        .replace("__CONFIG_MODULE__", _import_source(stock_config))
        .replace("__BASE_CLASS__", stock_model.__name__)
        .replace("__BASE_CONFIG__", stock_config.__name__)
        .replace("__CLASS_NAME__", model_name)
        .replace("__CONFIG_NAME__", config_name)
        .replace("__LAYERS_PATH__", names[id(spec.decoder_layers(model))])
        .replace("__LAYER_FACTORY__", spec.layer_factory)
        .replace("__STOCK_BUILD_CONFIG__", spec.stock_build_config)
        .replace("__HEADS_KEY__", spec.config_keys["num_heads"])
        .replace("__KV_HEADS_KEY__", spec.config_keys.get("num_kv_heads", spec.config_keys["num_heads"]))
        .replace("__FAMILY_CODE__", "\n\n".join(textwrap.dedent(inspect.getsource(f)) for f in spec.modeling_code))
        .replace("__REMOVED_BLOCK_CODE__", "\n\n".join(inspect.getsource(o) for o in (RemovedBlock, remove_block)))
        .replace("__REMOVABLE_BLOCKS__", repr({kind: (block.path, block.outputs, block.caches)
                                               for kind, block in spec.removable_blocks().items()}))
    )
    remote = [cls for cls in (stock_model, stock_config) if _is_remote(cls)]
    package = stock_model.__module__.rpartition(".")[0] if remote else ""
    module = _import_generated(f"modeling_adapruned_{stock_model.__name__.lower()}", source, package,
                               [Path(inspect.getfile(cls)) for cls in remote])
    model.__class__ = getattr(module, model_name)
    model.config.__class__ = getattr(module, config_name)
    model.__class__.register_for_auto_class("AutoModelForCausalLM")
    model.config.__class__.register_for_auto_class("AutoConfig")


def _is_remote(cls: type) -> bool:
    """Whether `cls` comes from a checkpoint's own code (`trust_remote_code`), not from transformers."""
    return not cls.__module__.startswith("transformers.")


def _import_source(cls: type) -> str:
    """Where the generated file imports `cls` from: transformers, or the family's file next to it."""
    return "." + cls.__module__.rpartition(".")[2] if _is_remote(cls) else "transformers"


def _stock_class(cls: type) -> type:
    while cls.__module__.rpartition(".")[2].startswith("modeling_adapruned_"):
        cls = cls.__bases__[0]
    return cls


def _import_generated(module_name: str, source: str, package: str = "", remote_files: Sequence[Path] = ()):
    """Write the generated source (and the remote files it imports) into the cache, and import it.

    With a `package` (the remote code's own), the module joins it, so that its relative imports
    resolve to the remote classes already loaded, not to copies of them.
    """
    remote_files = [f for path in remote_files for f in (path, *map(Path, get_relative_import_files(path)))]
    contents = {f.name: f.read_text() for f in remote_files}
    digest = hashlib.sha256("\0".join([source, *sorted(contents.values())]).encode()).hexdigest()[:12]
    full_name = f"{package}.{module_name}" if package else module_name
    module = sys.modules.get(full_name)
    if module is not None and getattr(module, "__adaprune_digest__", None) == digest:
        return module
    folder = cache_dir() / "modeling" / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module_name}.py"
    for name, text in {**contents, path.name: source}.items():
        _write_if_changed(folder / name, text)
    spec = importlib.util.spec_from_file_location(full_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    spec.loader.exec_module(module)
    module.__adaprune_digest__ = digest
    return module


def _write_if_changed(path: Path, text: str) -> None:
    # Write then rename, so that a concurrent reader never sees half a file.
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
