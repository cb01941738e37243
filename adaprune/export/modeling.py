"""The small modeling file saved with a checkpoint whose layers differ (or that a stock config cannot describe).

The model and config classes become thin subclasses of the stock ones, defined in a file
generated from `templates/modeling_heterogeneous.py.template`; `save_pretrained` copies it next to
the weights and registers it through `auto_map`, so `from_pretrained(dir, trust_remote_code=True)`
rebuilds every layer at its own size with no adaprune installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import textwrap
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from torch import nn
from transformers.dynamic_module_utils import get_relative_import_files

from ..apply.removed_block import RemovedBlock, remove_block
from ..io import cache_dir, write_text
from ..specs.base import ArchSpec, stock_class

TEMPLATE = "export/templates/modeling_heterogeneous.py.template"


def use_generated_classes(model: nn.Module, spec: ArchSpec) -> None:
    """Give `model` and its config the generated subclasses, registered for `auto_map`.

    Stock transformers classes are imported from `transformers`; a remote-code family's classes
    (Baichuan) from the family's own files, by a relative import: those files are copied next
    to the generated one, and `save_pretrained` copies them all into the checkpoint.
    """
    stock_model, stock_config = stock_class(type(model)), stock_class(type(model.config))
    names = {id(module): name for name, module in model.named_modules()}
    model_name, config_name = f"Adapruned{stock_model.__name__}", f"Adapruned{stock_config.__name__}"
    source = (
        resources.files("adaprune").joinpath(TEMPLATE).read_text()
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
        .replace("__REMOVABLE_BLOCKS__", repr({str(kind): (block.path, block.outputs, block.caches)
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
    # Atomic, so that a concurrent reader never sees half a file.
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
