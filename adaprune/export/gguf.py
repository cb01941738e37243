"""GGUF export: a (pruned) model as one file that llama.cpp, Ollama and LM Studio run.

Tensor names come from the `gguf` package's name map (`gguf.get_tensor_name_map`), never from a
list here; the family's llama.cpp architecture comes from its spec (`ArchSpec.gguf_arch`).

What llama.cpp accepts (read in its source, `src/llama-model.cpp`, `src/models/*.cpp`, and checked
by running it; see docs/deploy.md):

* "llama" and "qwen2" read `head_count`, `head_count_kv` and `feed_forward_length` as per-layer
  arrays (`llama_model::load_hparams`), but build every layer's tensors and graph from layer 0's
  values (`LLAMA_LOAD_LOCALS`): a file with shapes that differ per layer fails to load. So a model
  whose layers all have the same shape is written under its own architecture, with scalar keys;
  except a Qwen2 that lost heads: "qwen2" builds the query projection hidden_size wide
  (`src/models/qwen2.cpp`), so it goes to "deci" too.
* "deci" (Nemotron-NAS, `src/models/deci.cpp`) reads each layer's own head counts and MLP width,
  runs a layer with 0 heads as attention-free and skips one with an MLP width of 0. Llama, Mistral
  and Qwen2 layers are Deci layers (RMSNorm, grouped-query attention with optional q/k/v biases,
  SwiGLU MLP, rotary embeddings), so a model whose shapes differ per layer is written as "deci".
  Two limits of that code: a layer with an MLP width of 0 `continue`s before adding its attention
  output to the residual and before the last layer's row selection (it drops the attention, and
  aborts as the last layer), so a removed MLP is written as one channel of zeros (exactly nothing
  added, 4 x hidden parameters); and the head size is derived from layer 0's head count, so a model
  whose layer 0 lost its attention is refused.

Rotary embeddings: transformers rotates the two halves of each head (`rotate_half`); llama.cpp's
"llama" and "deci" rotate adjacent pairs, so their q/k rows (and biases) are permuted per head, as
llama.cpp's own converter does; its "qwen2" rotates halves and takes the rows as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..io import atomic_path
from ..plugins import detect_spec
from ..specs.base import LayerShape

DTYPES = ("f32", "f16", "q8_0")
# llama.cpp's rotary style per architecture: "pairs" needs q/k rows permuted from transformers' halves.
ROPE_PAIRS = {"llama": True, "deci": True, "qwen2": False}
# The per-layer architecture every exported family maps onto when its layers differ.
PER_LAYER_ARCH = "deci"
# Architectures whose query projection llama.cpp builds hidden_size wide (src/models/qwen2.cpp):
# a model that lost heads runs there only as "deci".
QUERY_IS_HIDDEN = {"qwen2"}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike[str],
    dtype: str = "f16",
    *,
    source_gguf: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `model` and `tokenizer` to the GGUF file `path`, for llama.cpp; return the path.

    `dtype`: "f32", "f16" (1-D tensors stay f32, as in llama.cpp's converter) or "q8_0" (MLP
    widths are padded with zero channels to a multiple of 32, which adds exactly nothing, so that
    every projection is quantized; other matrices whose rows are not whole 32-blocks stay f16). `source_gguf`: the GGUF file the model was
    loaded from (SmolLM2's, say): its tokenizer and chat-template metadata are copied verbatim, so
    llama.cpp tokenizes as it did with the original file. Without it, the vocabulary is built from
    the transformers tokenizer (byte-level BPE only).

    Layers of one shape give the family's own architecture; shapes that differ per layer (or
    removed blocks) give llama.cpp's "deci" architecture with per-layer arrays (see the module
    docstring). What llama.cpp cannot run raises ExportError.
    """
    if dtype not in DTYPES:
        raise ExportError(f"Unknown GGUF type {dtype!r}: choose one of {', '.join(DTYPES)}.")
    spec = detect_spec(model)
    if spec.gguf_arch is None:
        raise ExportError(f"llama.cpp has no architecture for the {spec.name} family here; GGUF export supports "
                          "the llama, mistral and qwen2 families (export a transformers checkpoint instead).")
    config = model.config
    shapes = [spec.layer_shape(model, layer) for layer in spec.decoder_layers(model)]
    head_dim = _head_dim(shapes)
    uniform = len(set(shapes)) == 1 and not shapes[0].removed_blocks()
    native = uniform and (spec.gguf_arch not in QUERY_IS_HIDDEN
                          or shapes[0].attention.num_heads * head_dim == config.hidden_size)
    arch = spec.gguf_arch if native else PER_LAYER_ARCH
    if arch == PER_LAYER_ARCH and shapes[0].attention.num_heads == 0:
        raise ExportError("Layer 0 lost its whole attention block: llama.cpp derives the head size from layer 0's "
                          "head count (llama_model::load_hparams) and cannot run this model. Prune again with "
                          "layer 0 excluded from block removal (e.g. --layers 1:N), or without whole blocks.")
    _check_rope(config)
    target = Path(path)
    if not target.parent.is_dir():
        raise ExportError(f"Cannot write {target}: the folder {target.parent} does not exist; create it first.")
    if not os.access(target.parent, os.W_OK):
        raise ExportError(f"Cannot write {target}: the folder {target.parent} is not writable; choose another path.")

    # q8_0 stores rows in blocks of 32: MLP widths are padded with zero channels (exactly nothing
    # added: silu(0) * 0 = 0) so that the down projection is quantized too; a removed MLP is one
    # zero channel (module docstring), padded alike.
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] if dtype == "q8_0" else 1
    widths = [-(-max(s.mlp_width, 1) // block) * block for s in shapes]
    tensors = _tensors(model, spec, arch, shapes, widths)
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_hparams(writer, config, shapes, widths, native, head_dim, vocab_rows, dtype)
        _write_vocab(writer, tokenizer, vocab_rows, source_gguf)
        for name, array in tensors:
            _add_tensor(writer, name, array, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


def _head_dim(shapes: Sequence[LayerShape]) -> int:
    dims = {s.attention.head_dim for s in shapes if s.attention.num_heads}
    if len(dims) != 1:
        raise ExportError(f"GGUF holds one head size for all layers; this model has {sorted(dims) or 'none'} "
                          "(no layer with attention, or head sizes that differ).")
    return dims.pop()


def _rope_parameters(config: Any) -> dict[str, Any]:
    # transformers 5 keeps rope settings in `rope_parameters`; older releases in rope_theta/rope_scaling.
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _check_rope(config: Any) -> None:
    kind = _rope_parameters(config).get("rope_type", _rope_parameters(config).get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(f"The model uses {kind!r} rotary scaling, which this GGUF export does not write yet "
                          "(default and linear only); use llama.cpp's convert_hf_to_gguf.py for it.")


def _permute_pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from transformers' halves (i, i + d/2) to llama.cpp's adjacent pairs."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _tensors(model: nn.Module, spec, arch: str, shapes: Sequence[LayerShape], widths: Sequence[int]
             ) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every tensor llama.cpp reads, in the file's order."""
    names = gguf.get_tensor_name_map(_arch_enum(arch), len(shapes))
    key = gguf.TENSOR_NAMES
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embed.data_ptr()
    layer_paths = {id(layer): i for i, layer in enumerate(spec.decoder_layers(model))}
    module_layer = {}
    for path, module in model.named_modules():
        if id(module) in layer_paths:
            module_layer[path] = layer_paths[id(module)]
    out: list[tuple[str, np.ndarray]] = []
    for hf_name, param in model.state_dict(keep_vars=True).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"No llama.cpp tensor name for {hf_name!r} in the {arch} architecture; this model "
                              "has a module llama.cpp does not run.")
        if tied and name == key[gguf.MODEL_TENSOR.OUTPUT] + ".weight":
            continue  # tied: llama.cpp reuses token_embd when the file has no output tensor
        array = param.detach().to(torch.float32).cpu().numpy()
        layer = _layer_of(name)
        if layer is not None:
            shape = shapes[layer]
            if _is(name, gguf.MODEL_TENSOR.ATTN_NORM, layer) and shape.attention.num_heads == 0:
                continue  # an attention-free Deci layer reads no attention norm
            if ROPE_PAIRS[arch] and _is(name, gguf.MODEL_TENSOR.ATTN_Q, layer):
                array = _permute_pairs(array, shape.attention.num_heads)
            elif ROPE_PAIRS[arch] and _is(name, gguf.MODEL_TENSOR.ATTN_K, layer):
                array = _permute_pairs(array, shape.attention.num_kv_heads)
            pad = widths[layer] - shape.mlp_width
            if pad and (_is(name, gguf.MODEL_TENSOR.FFN_GATE, layer) or _is(name, gguf.MODEL_TENSOR.FFN_UP, layer)):
                array = np.concatenate([array, np.zeros((pad, *array.shape[1:]), dtype=array.dtype)])
            elif pad and _is(name, gguf.MODEL_TENSOR.FFN_DOWN, layer) and name.endswith(".weight"):
                array = np.concatenate([array, np.zeros((array.shape[0], pad), dtype=array.dtype)], axis=1)
        out.append((name, array))
    # A removed MLP: zero channels (see the module docstring).
    hidden = embed.shape[1]
    for layer, shape in enumerate(shapes):
        if shape.mlp_width == 0:
            width = widths[layer]
            for tensor, dims in ((gguf.MODEL_TENSOR.FFN_GATE, (width, hidden)),
                                 (gguf.MODEL_TENSOR.FFN_UP, (width, hidden)),
                                 (gguf.MODEL_TENSOR.FFN_DOWN, (hidden, width))):
                out.append((key[tensor].format(bid=layer) + ".weight", np.zeros(dims, dtype=np.float32)))
    return out


def _is(name: str, tensor: gguf.MODEL_TENSOR, layer: int) -> bool:
    return name.rsplit(".", 1)[0] == gguf.TENSOR_NAMES[tensor].format(bid=layer)


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(enum for enum, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)


def _write_hparams(writer: gguf.GGUFWriter, config: Any, shapes: Sequence[LayerShape], widths: Sequence[int],
                   uniform: bool,
                   head_dim: int, vocab_rows: int, dtype: str) -> None:
    writer.add_name(str(getattr(config, "_name_or_path", "") or "adaprune-pruned").rstrip("/").split("/")[-1])
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_block_count(len(shapes))
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and window < context:
        # llama.cpp's "llama" and "deci" attend to the whole context: up to the window, that is exactly
        # sliding-window attention, so the trained context recorded is the window (Mistral v0.1: 4096).
        context = int(window)
    writer.add_context_length(context)
    writer.add_embedding_length(int(config.hidden_size))
    heads = [s.attention.num_heads for s in shapes]
    kv_heads = [s.attention.num_kv_heads for s in shapes]
    if uniform:
        writer.add_head_count(heads[0])
        writer.add_head_count_kv(kv_heads[0])
        writer.add_feed_forward_length(widths[0])
    else:
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_feed_forward_length(widths)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_rows)


def _write_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_rows: int,
                 source_gguf: str | os.PathLike[str] | None) -> None:
    if source_gguf is not None:
        _copy_vocab(writer, Path(source_gguf), vocab_rows)
        return
    with tempfile.TemporaryDirectory(prefix="adaprune-gguf-") as folder:
        tokenizer.save_pretrained(folder)
        data = json.loads((Path(folder) / "tokenizer.json").read_text()) if \
            (Path(folder) / "tokenizer.json").is_file() else None
        if data is None or data["model"]["type"] != "BPE" or data["model"].get("byte_fallback"):
            raise ExportError("GGUF export writes byte-level BPE tokenizers only (GPT-2 style, as SmolLM2, Llama 3 "
                              "and Qwen2 use); pass source_gguf= (--metadata-from) with the model's original GGUF "
                              "file to copy its tokenizer instead.")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(data))
        vocab = tokenizer.get_vocab()
        by_id = {index: token for token, index in vocab.items()}
        if max(by_id) >= vocab_rows:
            raise ExportError(f"The tokenizer has token id {max(by_id)}, beyond the {vocab_rows} embedding rows.")
        added = {token["id"]: token for token in data.get("added_tokens", [])}
        tokens, types = [], []
        for index in range(vocab_rows):
            if index not in by_id:
                tokens.append(f"[PAD{index}]")
                types.append(gguf.TokenType.UNUSED)
            else:
                tokens.append(by_id[index])
                special = added.get(index, {}).get("special")
                types.append(gguf.TokenType.CONTROL if special else
                             gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_rows)
        special_vocab.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(data: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (its split rules before BPE)."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (SmolLM/SmolLM2)
    pattern = json.dumps(steps[0].get("pattern", {})) if kinds and kinds[0] == "Split" else ""
    if "\\\\p{N}{1,3}" in pattern:
        return "llama-bpe"
    if "[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}|" in pattern:
        return "qwen2"
    raise ExportError(f"Unknown pre-tokenizer {kinds}: pass source_gguf= (--metadata-from) with the model's "
                      "original GGUF file to copy its tokenizer.")


def _copy_vocab(writer: gguf.GGUFWriter, source: Path, vocab_rows: int) -> None:
    """Copy the `tokenizer.*` keys (vocabulary, merges, special tokens, chat template) of `source`."""
    if not source.is_file():
        raise ExportError(f"{source} does not exist: give the GGUF file the model was loaded from.")
    reader = gguf.GGUFReader(source)
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise ExportError(f"{source} holds no tokenizer ({gguf.Keys.Tokenizer.LIST}).")
    if len(tokens.data) != vocab_rows:
        raise ExportError(f"{source} has {len(tokens.data)} tokens, the model {vocab_rows} embedding rows: it is "
                          "not the file this model came from.")
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), value_type)


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, dtype: str) -> None:
    # As llama.cpp's converter: vectors (norms, biases) stay f32; q8_0 needs rows of whole 32-blocks.
    if dtype == "f32" or array.ndim == 1:
        writer.add_tensor(name, array.astype(np.float32))
    elif dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, array.astype(np.float16))
