"""How the cost grows: random-initialised Llama-shaped models of growing size, each estimator.

    OMP_NUM_THREADS=1 python benchmarks/scale_benchmark.py
    python benchmarks/scale_benchmark.py --sizes 135M --quick      # a smoke run
    python benchmarks/scale_benchmark.py --device cuda --dtype bfloat16 --sizes 1.1B,3B,7B,8B \
        --samples 32,128 --seq-len 128 --threads 8 --out benchmarks/results/scale-gpu   # on a GPU

Sizes (float32, random init, the shapes of public checkpoints): ``135M`` (SmolLM2-135M), ``360M``
(SmolLM2-360M), ``1.1B`` (TinyLlama-1.1B); ``3B`` (Llama-3.2-3B) only with ``--sizes ...,3B``: in
float32 with Taylor it needs about 2 x 13 GB, more than this machine's 23 GB leaves. ``7B``
(Llama-2-7B) and ``8B`` (Llama-3-8B, GQA) are for a GPU, in bfloat16 (``--device cuda --dtype bfloat16``):
the model is built on the device, and the memory measured is the device's
(`torch.cuda.max_memory_allocated`, reset before each step; the CUDA runtime holds none of it), with
the host's peak RSS beside it.

Each size runs in a fresh process with one thread (``--threads`` for more). The process first
measures its runtime (resident memory once Python, torch, transformers and adaprune are imported), builds the model
(not timed as a stage), then for each estimator, with the default fusion (`adaptive`, its default
options) and the default allocation:

* ``score``: `Pruner.score(batches)`: calibration (the one pass) and the estimator's scoring;
* ``plan``: `Pruner.plan(batches, scores=...)`: the fusion (the adaptive one trains its blend on
  the same batches) and the allocation;

and, once per size (Taylor's plan), ``apply``: slicing the model (reconstruction off: its cost
grows with the cube of the widths, not with parameters x tokens; it is measured separately by
benchmarks/quality_benchmark.py). With ``--defaults``, a row ``defaults`` instead: the default
configuration end to end (score and plan with Taylor + activation, adaptive fusion, global
allocation; ``apply`` = slicing + the reconstruction + its bookkeeping, broken down in the JSON).
Before each step the kernel's peak-RSS counter is reset (/proc/self/clear_refs), so each step's
peak is its own; the memory multiple is (peak - runtime) / the model's bytes.

The fit: log(seconds) = a + b log(parameters x calibration tokens), least squares over the sizes
(and the token-scaled points), per estimator and stage. Magnitude needs no calibration: its
scoring is fitted against parameters alone.
Results: benchmarks/results/scale.{json,md,png} (`--out` for another path: a run writes after every size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
ESTIMATORS = ("magnitude", "taylor", "activation", "fluctuation")

# name -> LlamaConfig fields (shapes of public checkpoints; the weights are random)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),  # smoke runs only
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def _status(field: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap back to the kernel, so a case's leftovers do not count towards the next one
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class _Memory:
    """Peak memory of one step: the process's resident set on the CPU, the device's allocations on CUDA."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch
        self.runtime = 0 if self.cuda else _status("VmRSS")  # device memory: nothing held before the model

    def reset(self) -> bool:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        return _reset_peak()

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return _status("VmHWM")


def worker(size: str, samples: list[int], seq_len: int, estimators: list[str], device: str = "cpu",
           dtype: str = "float32", threads: int = 1, defaults: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaprune import Pruner

    memory = _Memory(device)
    runtime = _status("VmRSS")
    torch.manual_seed(0)
    start = time.perf_counter()
    config = LlamaConfig(**SHAPES[size], max_position_embeddings=2048)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):  # built where it runs: a 7B model is never materialised on the host
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    build = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    rows = []
    to_apply = None
    for count in samples:
        batches = [torch.randint(0, config.vocab_size, (2, seq_len), generator=generator) for _ in range(count // 2)]
        tokens = count * seq_len
        names = estimators if count == samples[0] else [e for e in estimators if e != "magnitude"]
        for name in names:
            pruner = Pruner(model, ratio=0.2, estimators=[name], reconstruct=False, progress=False)
            row = {"size": size, "params": params, "model_bytes": model_bytes, "tokens": tokens, "estimator": name}
            reset = memory.reset()
            cache = pruner.score(batches)
            row["score_peak"] = memory.peak()
            row["score_host_peak"] = _status("VmHWM")
            memory.reset()
            plan = pruner.plan(batches, scores=cache)
            row["plan_peak"] = memory.peak()
            row["plan_host_peak"] = _status("VmHWM")
            row["seconds"] = dict(pruner.timings)
            row["peak_reset"] = reset
            if name == "taylor" and count == samples[0]:
                to_apply = (pruner, plan, row)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("size", "tokens", "estimator", "seconds")}), file=sys.stderr,
                  flush=True)
    if defaults:  # the whole default path instead of slicing Taylor's plan: it changes the model too
        to_apply = None
        batches = [torch.randint(0, config.vocab_size, (2, seq_len), generator=generator)
                   for _ in range(samples[0] // 2)]
        pruner = Pruner(model, ratio=0.2, progress=False)
        row = {"size": size, "params": params, "model_bytes": model_bytes, "tokens": samples[0] * seq_len,
               "estimator": "defaults"}
        memory.reset()
        plan = pruner.plan(batches)
        row["score_peak"] = row["plan_peak"] = memory.peak()
        row["score_host_peak"] = row["plan_host_peak"] = _status("VmHWM")
        memory.reset()
        pruner.apply(plan)  # slicing and the reconstruction, on the plan's batches
        row["apply_peak"] = memory.peak()
        row["apply_host_peak"] = _status("VmHWM")
        after = ("apply", "reconstruct", "slice")  # the table's "apply" column: all three, broken down in the JSON
        row["apply_stages"] = {k: v for k, v in pruner.timings.items() if k in after}
        row["seconds"] = {**{k: v for k, v in pruner.timings.items() if k not in after},
                          "apply": round(sum(row["apply_stages"].values()), 3)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("size", "tokens", "estimator", "seconds")}), file=sys.stderr, flush=True)
    if to_apply is not None:  # slicing changes the model: last
        pruner, plan, row = to_apply
        memory.reset()
        pruner.apply(plan)
        row["seconds"]["apply"] = pruner.timings["apply"]
        row["apply_peak"] = memory.peak()
        row["apply_host_peak"] = _status("VmHWM")
    for row in rows:
        for key in ("score_peak", "plan_peak", "apply_peak"):
            if key in row:
                row[key.replace("peak", "multiple")] = round((row[key] - memory.runtime) / model_bytes, 3)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"size": size, "runtime_bytes": runtime, "build_seconds": round(build, 2), "rows": rows}


def fit(points: list[tuple[float, float]]) -> float | None:
    """The slope of log(y) against log(x), least squares."""
    points = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return round(sum((x - mx) * (y - my) for x, y in points) / sxx, 3) if sxx else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="135M,360M,1.1B")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--samples", default="4,16", help="calibration samples; the later counts only at the first size")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--device", default="cpu", help="where the model is built and pruned (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (float32, bfloat16)")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads in each size's process")
    parser.add_argument("--defaults", action="store_true",
                        help="also run the default configuration (Taylor + activation, adaptive, global, reconstruction) "
                             "end to end at each size, in place of slicing Taylor's plan")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--quick", action="store_true", help="write nothing, print the rows")
    parser.add_argument("--out", default=str(RESULTS / "scale"), help="results path without suffix (.json, .md, .png)")
    args = parser.parse_args()
    samples = [int(s) for s in args.samples.split(",")]
    estimators = args.estimators.split(",")
    if args.worker:
        size, counts = args.worker.split(":")
        print(json.dumps(worker(size, [int(c) for c in counts.split("/")], args.seq_len, estimators,
                                args.device, args.dtype, args.threads, args.defaults)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = []
    sizes = args.sizes.split(",")
    for i, size in enumerate(sizes):
        counts = samples if i == 0 else samples[:1]  # more tokens at the smallest size: the token axis
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--worker", f"{size}:{'/'.join(map(str, counts))}",
                               "--seq-len", str(args.seq_len), "--estimators", args.estimators,
                               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
                               *(["--defaults"] if args.defaults else [])],
                              env=env, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"size {size} failed (exit {done.returncode})")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["wall_seconds"] = round(time.perf_counter() - start, 1)
        runs.append(run)
        # Written after every size, so that a run stopped by a time limit keeps the sizes it finished.
        record = summarise(runs, estimators, args, samples, skipped=sizes[i + 1:])
        if not args.quick:
            write(record, Path(args.out))
    print(json.dumps(record, indent=1) if args.quick else table(record))


def summarise(runs: list[dict], estimators: list[str], args: argparse.Namespace, samples: list[int],
              skipped: list[str]) -> dict:
    rows = [row for run in runs for row in run["rows"]]
    fits = {}
    for name in estimators:
        mine = [r for r in rows if r["estimator"] == name]
        for stage in ("calibration", "scoring", "fusion"):
            pts = [((r["params"] if name == "magnitude" else r["params"] * r["tokens"]), r["seconds"].get(stage, 0))
                   for r in mine]
            fits[f"{name}/{stage}"] = fit(pts)
        fits[f"{name}/score+plan"] = fit([((r["params"] if name == "magnitude" else r["params"] * r["tokens"]),
                                           sum(r["seconds"].values()) - r["seconds"].get("apply", 0)) for r in mine])
    return {"machine": _machine(args), "device": args.device, "dtype": args.dtype,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "seq_len": args.seq_len,
            "samples": samples, "runs": runs, "fitted_exponents": fits, "load_average": os.getloadavg(),
            "not_run": skipped}


def _machine(args: argparse.Namespace) -> str:
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    host = f"{platform.machine()} {os.cpu_count()} CPUs, {threads}"
    if args.device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, host {host}"
    return f"{host}, shared"


def write(record: dict, out: Path) -> None:
    from adaprune.io import write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps(record, indent=1))
    write_text(out.with_suffix(".md"), table(record))
    plot(record, out.with_suffix(".png"))


def table(record: dict) -> str:
    on_device = record.get("device", "cpu").startswith("cuda")
    memory = ("peak device memory allocated (torch.cuda.max_memory_allocated, the model included)" if on_device
              else "peak resident memory above the runtime")
    lines = [f"# Cost against size (random-init Llama shapes, {record.get('dtype', 'float32')}, {record['machine']}, "
             f"{record['date']})", "",
             f"Seconds per stage, and {memory} as a multiple of the model's bytes "
             "(score = calibration + scoring; plan = fusion + allocation; apply = slicing).", "",
             "| size | params | tokens | estimator | calibration s | scoring s | fusion s | allocation s | apply s "
             "| score peak / model | plan peak / model | apply peak / model |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in record["runs"]:
        for r in run["rows"]:
            s = r["seconds"]
            lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['tokens']} | {r['estimator']} | "
                         f"{s.get('calibration', 0):.2f} | {s.get('scoring', 0):.2f} | {s.get('fusion', 0):.2f} | "
                         f"{s.get('allocation', 0):.2f} | {s['apply']:.2f} | " if "apply" in s else
                         f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['tokens']} | {r['estimator']} | "
                         f"{s.get('calibration', 0):.2f} | {s.get('scoring', 0):.2f} | {s.get('fusion', 0):.2f} | "
                         f"{s.get('allocation', 0):.2f} | | ")
            lines[-1] += (f"{r['score_multiple']:.2f} | {r['plan_multiple']:.2f} | "
                          f"{r['apply_multiple']:.2f} |" if "apply_multiple" in r else
                          f"{r['score_multiple']:.2f} | {r['plan_multiple']:.2f} | |")
    lines += ["", "Runtime (Python + torch + transformers + adaprune, resident before the model): "
              + ", ".join(f"{run['size']}: {run['runtime_bytes'] / 2**20:.0f} MiB" for run in record["runs"]), "",
              "Fitted exponent b of seconds ~ (parameters x tokens)^b (magnitude: parameters^b), least squares:", "",
              "| estimator / stage | exponent |", "|---|---:|",
              *[f"| {k} | {'' if v is None else f'{v:.2f}'} |" for k, v in record["fitted_exponents"].items()], "",
              f"Load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in record['load_average'])}; "
              f"wall seconds per size (build included): "
              + ", ".join(f"{run['size']}: {run['wall_seconds']:.0f}" for run in record["runs"]), ""]
    if record.get("not_run"):
        lines.append(f"Not run (the run stopped or was limited): {', '.join(record['not_run'])}.")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for run in record["runs"] for r in run["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["estimator"] for r in rows):
        mine = sorted((r for r in rows if r["estimator"] == name), key=lambda r: r["params"] * r["tokens"])
        x = [r["params"] * r["tokens"] for r in mine]
        left.loglog(x, [sum(v for k, v in r["seconds"].items() if k != "apply") for r in mine], "o-", label=name)
        right.semilogx(x, [max(r["score_multiple"], r["plan_multiple"]) for r in mine], "o-", label=name)
    left.set(xlabel="parameters x calibration tokens", ylabel="seconds (score + plan)", title="time")
    right.set(xlabel="parameters x calibration tokens", ylabel="peak above runtime / model bytes", title="memory")
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    from adaprune.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
