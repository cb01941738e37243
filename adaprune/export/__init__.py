"""Leaving adaprune: a config kept true (`config`), the generated modeling file (`modeling`)."""
