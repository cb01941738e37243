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
import os
import sys
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn

from .specs import ArchSpec, LayerShape


def cache_dir() -> Path:
    """adaprune's cache folder: `$ADAPRUNE_CACHE`, else `~/.cache/adaprune`."""
    return Path(os.environ.get("ADAPRUNE_CACHE") or Path.home() / ".cache" / "adaprune")


def sync_config(model: nn.Module, spec: ArchSpec, shapes: Sequence[LayerShape]) -> None:
    """Write the per-layer `shapes` into `model.config` (and the model class, if they differ)."""
    config = model.config
    if getattr(config, "is_heterogeneous", False):
        config.per_layer_config = None
    fields = [s.to_dict() for s in shapes]
    common = Counter(tuple(sorted(f.items())) for f in fields).most_common(1)[0][0]
    common = dict(common)
    for field, key in spec.config_keys.items():
        setattr(config, key, common[field])
    overrides = {
        index: {spec.config_keys[k]: v for k, v in layer_fields.items() if v != common[k]}
        for index, layer_fields in enumerate(fields)
        if layer_fields != common
    }
    if overrides:
        config.per_layer_config = overrides
    if overrides or not stock_config_accepts(config):
        use_generated_classes(model, spec)


def stock_config_accepts(config) -> bool:
    """Whether the stock config class validates these shapes (it refuses, say, 7 heads for hidden 64)."""
    try:
        _stock_class(type(config)).validate(config)
    except (ValueError, TypeError, StrictDataclassClassValidationError):
        return False
    return True


def use_generated_classes(model: nn.Module, spec: ArchSpec) -> None:
    """Give `model` and its config the generated subclasses, registered for `auto_map`."""
    stock_model, stock_config = _stock_class(type(model)), _stock_class(type(model.config))
    names = {id(module): name for name, module in model.named_modules()}
    model_name, config_name = f"Adapruned{stock_model.__name__}", f"Adapruned{stock_config.__name__}"
    source = (
        resources.files("adaprune").joinpath("templates/modeling_heterogeneous.py.template").read_text()
        .replace("__BASE_CLASS__", stock_model.__name__)
        .replace("__BASE_CONFIG__", stock_config.__name__)
        .replace("__CLASS_NAME__", model_name)
        .replace("__CONFIG_NAME__", config_name)
        .replace("__LAYERS_PATH__", names[id(spec.decoder_layers(model))])
        .replace("__LAYER_FACTORY__", spec.layer_factory)
        .replace("__HEADS_KEY__", spec.config_keys["num_heads"])
        .replace("__KV_HEADS_KEY__", spec.config_keys.get("num_kv_heads", spec.config_keys["num_heads"]))
    )
    module = _import_generated(f"modeling_adapruned_{stock_model.__name__.lower()}", source)
    model.__class__ = getattr(module, model_name)
    model.config.__class__ = getattr(module, config_name)
    model.__class__.register_for_auto_class("AutoModelForCausalLM")
    model.config.__class__.register_for_auto_class("AutoConfig")


def _stock_class(cls: type) -> type:
    while cls.__module__.startswith("modeling_adapruned_"):
        cls = cls.__bases__[0]
    return cls


def _import_generated(module_name: str, source: str):
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__adaprune_digest__", None) == digest:
        return module
    folder = cache_dir() / "modeling" / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    module.__adaprune_digest__ = digest
    return module
