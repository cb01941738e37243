"""Models larger than memory: weights streamed from the safetensors files one layer at a time."""

from .checkpoint import CheckpointWeights, empty_model

__all__ = ["CheckpointWeights", "empty_model"]
