"""Offload benchmark: a model 3x larger than the memory it is given, pruned one layer at a time.

    python benchmarks/offload_benchmark.py

A random-initialised Llama-shaped model (float32, about 4 GiB with the defaults below) is saved as
sharded safetensors. Then, each in a fresh process:

1. streamed: `Pruner(empty_model(folder), offload=folder, ratio=0.2)` (the other settings the
   defaults: Taylor and activation candidates, the adaptive fusion, global allocation,
   reconstruction; `--fusion fixed` for the fusion that does not train) plans and saves, inside
   a cgroup (v1 memory controller) whose limit is a third of the model's bytes: the whole process,
   Python and torch included, must fit, or the kernel stops it;
2. in memory: the same prune of the model loaded whole, no limit.

The two plans must remove the same units, and the two saved checkpoints give the same logits
(reloaded by transformers). Reported: the model's bytes, the limit, each run's peak resident memory
(VmHWM) and the cgroup's peak charge, wall times. Where no cgroup can be made, the streamed run is
measured without a limit (said so in the results). Writes benchmarks/results/offload.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One prune in this process: streamed (offload) or in memory; writes its measurements."""
    import torch

    from adaprune import Pruner
    from adaprune.streaming import empty_model

    torch.set_num_threads(args.threads)
    folder, out = Path(args.folder), Path(args.out)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (4, args.seq_len), generator=generator)
               for _ in range(args.samples // 4)]
    start = time.perf_counter()
    if args.child == "streamed":
        pruner = Pruner(empty_model(folder), offload=folder, ratio=args.ratio, fusion=args.fusion, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        pruner = Pruner(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ratio=args.ratio,
                        fusion=args.fusion, progress=False)
    loaded = time.perf_counter() - start
    plan = pruner.plan(batches)
    pruner.save(plan, out)
    result = {"seconds": time.perf_counter() - start, "load_seconds": loaded, "stage_seconds": pruner.timings,
              "peak_rss_mb": peak_rss_mb(), "removed": plan.params["removed"]}
    Path(args.result).write_text(json.dumps(result))


def run_child(kind: str, args: argparse.Namespace, folder: Path, out: Path, cgroup: Path | None) -> dict:
    result = out.with_suffix(".json")
    command = [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--out", str(out),
               "--result", str(result), "--ratio", str(args.ratio), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--threads", str(args.threads),
               "--fusion", args.fusion]

    def enter_cgroup() -> None:  # in the child, before Python starts: everything it allocates is charged
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    process = subprocess.run(command, preexec_fn=enter_cgroup if cgroup else None)
    if process.returncode != 0:
        raise SystemExit(f"the {kind} run failed (exit {process.returncode}"
                         f"{'; the memory limit was hit' if process.returncode == -9 else ''})")
    return json.loads(result.read_text())


def make_cgroup(limit: int) -> Path | None:
    """A cgroup v1 memory group with `limit` bytes (swap too, where the kernel counts it), or None."""
    group = CGROUP_ROOT / f"adaprune-offload-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
    except OSError:
        if group.exists():
            group.rmdir()
        return None
    return group


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["streamed", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--fusion", default="adaptive", help="the Pruner's fusion (default: the Pruner's default)")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples (random tokens)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit-fraction", type=float, default=1 / 3, help="memory limit / model bytes")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--results", default=str(RESULTS / "offload"), help="results path without suffix")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    work = Path(args.work or tempfile.mkdtemp(prefix="adaprune-offload-"))
    dense = work / "dense"
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = LlamaForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(dense, max_shard_size="500MB")
    del model
    print(f"random-init model: {parameters / 1e6:.0f}M parameters, {model_bytes / 2**30:.2f} GiB, saved in "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    limit = int(model_bytes * args.limit_fraction)
    cgroup = make_cgroup(limit)
    try:
        streamed = run_child("streamed", args, dense, work / "streamed", cgroup)
        if cgroup:
            streamed["cgroup_peak_mb"] = int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**20
            streamed["cgroup_failcnt"] = int((cgroup / "memory.failcnt").read_text())
    finally:
        if cgroup:
            cgroup.rmdir()
    print(f"streamed: {streamed['seconds']:.0f} s, peak RSS {streamed['peak_rss_mb']:.0f} MiB", flush=True)
    memory = run_child("memory", args, dense, work / "memory", None)
    print(f"in memory: {memory['seconds']:.0f} s, peak RSS {memory['peak_rss_mb']:.0f} MiB", flush=True)

    same_plan = json.loads((work / "streamed" / "adaprune_plan.json").read_text())["layers"] == \
        json.loads((work / "memory" / "adaprune_plan.json").read_text())["layers"]
    ids = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = []
    for name in ("streamed", "memory"):
        pruned = AutoModelForCausalLM.from_pretrained(work / name, trust_remote_code=True).eval()
        with torch.no_grad():
            logits.append(pruned(ids).logits)
        del pruned
    difference = float((logits[0] - logits[1]).abs().max())
    report = {
        "settings": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                     "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "dtype": "float32",
                     "ratio": args.ratio, "calibration": f"{args.samples} x {args.seq_len} random tokens",
                     "pruner": "the defaults (Taylor + activation, adaptive fusion, global, reconstruction)"
                               if args.fusion == "adaptive" else
                               f"the defaults but fusion={args.fusion!r} (Taylor + activation, global, reconstruction)",
                     "threads": args.threads, "command": "python benchmarks/offload_benchmark.py"
                                + ("" if args.fusion == "adaptive" else f" --fusion {args.fusion}")},
        "parameters": parameters, "model_mb": model_bytes / 2**20, "limit_mb": limit / 2**20,
        "limit": "cgroup v1 memory.limit_in_bytes on the streamed process" if cgroup else
                 "none (no cgroup could be made here): RSS measured only",
        "streamed": streamed, "in_memory": memory,
        "same_plan": same_plan, "max_logit_difference": difference, "same_logits": difference == 0.0,
    }
    from adaprune.io import write_text

    out = Path(args.results)
    write_text(out.with_suffix(".json"), json.dumps(report, indent=1))
    write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same_plan and difference == 0.0 else 1


def markdown(r: dict) -> str:
    s, streamed, memory = r["settings"], r["streamed"], r["in_memory"]
    lines = [
        "# Offload benchmark: a model 3x larger than its memory limit",
        "",
        f"`{s['command']}`: random-init Llama ({s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']} heads / {s['kv_heads']} KV heads, vocabulary {s['vocab']}, {s['dtype']}): "
        f"{r['parameters'] / 1e6:.0f}M parameters, {r['model_mb']:.0f} MiB. Pruner: {s['pruner']}, ratio "
        f"{s['ratio']}, calibration {s['calibration']}, {s['threads']} threads. Limit: {r['limit']}.",
        "",
        "| run | memory limit MiB | model / limit | peak RSS MiB | peak RSS / model | cgroup peak MiB | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| streamed (offload) | {r['limit_mb']:.0f} | {r['model_mb'] / r['limit_mb']:.2f}x | "
        f"{streamed['peak_rss_mb']:.0f} | {streamed['peak_rss_mb'] / r['model_mb']:.2f} | "
        f"{streamed.get('cgroup_peak_mb', float('nan')):.0f} | {streamed['seconds']:.0f} |",
        f"| in memory | none | - | {memory['peak_rss_mb']:.0f} | {memory['peak_rss_mb'] / r['model_mb']:.2f} | - | "
        f"{memory['seconds']:.0f} |",
        "",
        f"Same plan (units removed): {'yes' if r['same_plan'] else 'NO'}; same logits after reload: "
        f"{'yes' if r['same_logits'] else 'NO'} (largest difference {r['max_logit_difference']:.3g}).",
        "",
        "Stage seconds, streamed: " + ", ".join(f"{k} {v:.0f}" for k, v in streamed["stage_seconds"].items())
        + "; in memory: " + ", ".join(f"{k} {v:.0f}" for k, v in memory["stage_seconds"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
