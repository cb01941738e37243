"""Leaving adaprune: a config kept true (`config`), the generated modeling file (`modeling`),
and a GGUF file for llama.cpp (`gguf`)."""
