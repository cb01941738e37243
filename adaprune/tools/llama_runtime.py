"""Opening a GGUF file in llama.cpp (llama-cpp-python, the `llama` extra) the way adaprune's tests and
deploy benchmark do.

Weight repacking into llama.cpp's extra buffer types is off (`use_extra_bufts = False`, what
llama.cpp's `--no-repack` does): on CPUs with AMX, llama.cpp 0.3.36 moves q8_0 tensors, the token
embedding included, into its AMX buffer and then crashes (SIGSEGV) on the first evaluation. Seen on
this project's machines; f16 and f32 files are unaffected. llama-cpp-python's `Llama` does not take
the setting, so it is set on the default model parameters it starts from.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


def open_gguf(path: str, **options: Any):
    """`llama_cpp.Llama(model_path=path, **options)` with weight repacking off."""
    import llama_cpp

    with _without_repacking():
        return llama_cpp.Llama(model_path=str(path), **options)


@contextmanager
def _without_repacking() -> Iterator[None]:
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def without():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults
