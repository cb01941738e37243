"""How long one global allocation takes at the shapes of real models (random scores, no weights).

    OMP_NUM_THREADS=1 python benchmarks/allocation_benchmark.py [--repeats 5]

The adaptive fusion allocates at every training step and check (about 30 times per plan), so at
7B a slow allocation, not the GPU, set the fusion's time: 62 s on an H200, ~1.8 s per allocation
(benchmarks/results/scale-gpu.md). The models are built on the meta device: only their shapes count.
Prints the median seconds per allocation for each shape at 20 % and 50 %.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaprune.allocation.base import AllocationScores
from adaprune.allocation.budget import Budget
from adaprune.allocation.ranked import GlobalAllocator
from adaprune.pipeline import eligible_layers, parse_units
from adaprune.plugins import detect_spec
from adaprune.units.table import UnitTable

SHAPES = {  # hidden, MLP width, layers, heads, KV heads
    "135M": (576, 1536, 30, 9, 3), "1.1B": (2048, 5632, 22, 32, 4), "7B": (4096, 11008, 32, 32, 32),
    "8B": (4096, 14336, 32, 32, 8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| shape | ratio | units | seconds per allocation (median) |\n|---|---:|---:|---:|")
    for name, (hidden, width, layers, heads, kv) in SHAPES.items():
        config = LlamaConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=1000)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        table = UnitTable(model, detect_spec(model))
        generator = torch.Generator().manual_seed(0)
        scores = {level: [torch.rand(layer.num_units[level], generator=generator, dtype=torch.float64)
                          for layer in table] for level in table.layers[0].num_units}
        units = sum(len(per_layer[0]) * layers for per_layer in scores.values())
        for ratio in (0.2, 0.5):
            budget = Budget(ratio, parse_units(("kv_groups", "channels")), eligible_layers(len(table), None), 8)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                GlobalAllocator().allocate(table, AllocationScores(scores, {}), budget)
                times.append(time.perf_counter() - start)
            print(f"| {name} | {ratio:g} | {units} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
