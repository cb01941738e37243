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

    python benchmarks/offload_benchmark.py --scoring-peak --threads 1 --work /tmp/adaprune-offload

The streamed scoring alone: `Pruner(empty_model(folder), offload=folder, estimators=E,
fusion="fixed").score(batches)` for each estimator set E, each in a fresh process (and each
`--repeats` times), on the same checkpoint (kept in `--work` and reused if it is there). Reported:
the scoring's peak resident memory above what the process held before it (the runtime: Python,
torch, transformers, the meta model), against the target for the forward-only estimators: one
decoder layer, the embeddings and the calibration hidden states. The peak is the kernel's VmHWM,
reset just before `score()` (/proc/self/clear_refs); a thread sampling /proc/self/status says how
much of it was anonymous memory and how much mapped checkpoint pages. Writes
benchmarks/results/streamed_peak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def peak_rss_mb() -> float:
    return memory_status().get("VmHWM", float("nan"))


def memory_status() -> dict[str, float]:
    """This process's VmHWM, VmRSS, RssAnon and RssFile, in MiB."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    return status


def reset_peak() -> bool:
    """Reset VmHWM to the present resident memory (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Sampler(threading.Thread):
    """Reads /proc/self/status every few milliseconds and keeps the reading with the most resident
    memory: how the peak divides into anonymous memory and mapped file pages (VmHWM is the peak
    itself; a sample can fall just short of it)."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.most, self.done = interval, {"VmRSS": 0.0}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status = memory_status()
            if status["VmRSS"] > self.most["VmRSS"]:
                self.most = status
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        return self.most


def calibration_batches(args: argparse.Namespace):
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, args.vocab, (4, args.seq_len), generator=generator) for _ in range(args.samples // 4)]


def scoring_child(args: argparse.Namespace) -> None:
    """The streamed scoring alone, in this fresh process: its peak above the memory held before it."""
    import torch

    from adaprune import Pruner
    from adaprune.streaming import empty_model

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    batches = calibration_batches(args)
    pruner = Pruner(empty_model(folder), offload=folder, estimators=args.estimators.split("+"), fusion="fixed",
                    progress=False)
    before = memory_status()
    reset = reset_peak()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    pruner.score(batches)
    seconds = time.perf_counter() - start
    at_peak = sampler.stop()
    after = memory_status()
    result = {"estimators": args.estimators, "runtime_mb": before["VmRSS"], "peak_reset": reset,
              "peak_above_runtime_mb": after["VmHWM"] - before["VmRSS"],
              # Mapped file pages still resident once every layer is released: torch's code (and
              # data) pages the scoring touched first; the checkpoint's mappings are gone by then.
              "code_pages_mb": after["RssFile"] - before["RssFile"],
              "sampled_peak": {k: at_peak[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")},
              "after_mb": after["VmRSS"] - before["VmRSS"], "seconds": seconds}
    Path(args.result).write_text(json.dumps(result))


def child(args: argparse.Namespace) -> None:
    """One prune in this process: streamed (offload) or in memory; writes its measurements."""
    import torch

    from adaprune import Pruner
    from adaprune.streaming import empty_model

    torch.set_num_threads(args.threads)
    folder, out = Path(args.folder), Path(args.out)
    batches = calibration_batches(args)
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
    parser.add_argument("--child", choices=["streamed", "memory", "scoring"], help=argparse.SUPPRESS)
    parser.add_argument("--estimators", help=argparse.SUPPRESS)
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
    parser.add_argument("--results", default=None, help="results path without suffix (default: "
                        "benchmarks/results/offload, or streamed_peak with --scoring-peak)")
    parser.add_argument("--scoring-peak", action="store_true",
                        help="measure the streamed scoring's peak per estimator set instead (see above)")
    parser.add_argument("--peak-estimators", nargs="+",
                        default=["magnitude", "activation", "fluctuation", "activation+fluctuation",
                                 "taylor+activation"],
                        help="estimator sets for --scoring-peak, '+' joining the estimators of one set")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per estimator set (--scoring-peak)")
    args = parser.parse_args()
    if args.child == "scoring":
        scoring_child(args)
        return 0
    if args.child:
        child(args)
        return 0
    if args.scoring_peak:
        return scoring_peak(args)

    import torch
    from transformers import AutoModelForCausalLM

    work = Path(args.work or tempfile.mkdtemp(prefix="adaprune-offload-"))
    dense = work / "dense"
    parameters, model_bytes = checkpoint(args, dense)

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
    _finish(report, markdown(report), Path(args.results or RESULTS / "offload"), None if args.work else work)
    return 0 if same_plan and difference == 0.0 else 1


def checkpoint(args: argparse.Namespace, dense: Path, reuse: bool = False) -> tuple[int, int]:
    """Save the random-initialised model in `dense` (sharded safetensors); its parameters and bytes.
    With `reuse`, a checkpoint already there with the same config is kept."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    if reuse and (dense / "model.safetensors.index.json").is_file():
        saved = LlamaConfig.from_pretrained(dense)
        if all(getattr(saved, k) == getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                                   "num_attention_heads", "num_key_value_heads",
                                                                   "vocab_size")):
            with torch.device("meta"):
                model = LlamaForCausalLM(config)
            print(f"reusing the checkpoint in {dense}", flush=True)
            return sum(p.numel() for p in model.parameters()), sum(p.numel() * 4 for p in model.parameters())
    torch.manual_seed(0)
    start = time.perf_counter()
    model = LlamaForCausalLM(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(dense, max_shard_size="500MB")
    del model
    print(f"random-init model: {parameters / 1e6:.0f}M parameters, {model_bytes / 2**30:.2f} GiB, saved in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return parameters, model_bytes


def scoring_peak(args: argparse.Namespace) -> int:
    """The streamed scoring's peak per estimator set, each run in a fresh process; 0 if every
    forward-only set met the target in every run."""
    work = Path(args.work or tempfile.mkdtemp(prefix="adaprune-offload-"))
    dense = work / "dense"
    parameters, model_bytes = checkpoint(args, dense, reuse=True)
    head_dim = args.hidden // args.heads
    layer = 4 * (2 * args.hidden * args.hidden + 2 * args.hidden * args.kv_heads * head_dim
                 + 3 * args.hidden * args.intermediate + 2 * args.hidden)  # attention, MLP, two norms (float32)
    embeddings = 4 * args.vocab * args.hidden  # tied: the head is the same tensor
    hidden = 4 * (args.samples // 4 * 4) * args.seq_len * args.hidden  # the batches of calibration_batches
    target = (layer + embeddings + hidden) / 2**20
    runs = {}
    for estimators in args.peak_estimators:
        runs[estimators] = []
        for repeat in range(args.repeats):
            result = work / f"peak-{estimators}-{repeat}.json"
            command = [sys.executable, __file__, "--child", "scoring", "--estimators", estimators, "--folder",
                       str(dense), "--result", str(result), "--samples", str(args.samples), "--seq-len",
                       str(args.seq_len), "--vocab", str(args.vocab), "--threads", str(args.threads)]
            if subprocess.run(command).returncode != 0:
                raise SystemExit(f"the scoring run with {estimators} failed")
            runs[estimators].append(json.loads(result.read_text()))
            r = runs[estimators][-1]
            print(f"{estimators} run {repeat + 1}: peak {r['peak_above_runtime_mb']:.0f} MiB above the runtime "
                  f"({r['runtime_mb']:.0f} MiB), {r['seconds']:.0f} s", flush=True)
    forward_only = [e for e in runs if not {"taylor"} & set(e.split("+"))]
    met = all(r["peak_above_runtime_mb"] <= target for e in forward_only for r in runs[e])
    command = "python benchmarks/offload_benchmark.py --scoring-peak --threads " + str(args.threads)
    report = {
        "settings": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                     "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "dtype": "float32",
                     "calibration": f"{args.samples} x {args.seq_len} random tokens, batches of 4",
                     "threads": args.threads, "repeats": args.repeats, "command": command},
        "parameters": parameters, "model_mb": model_bytes / 2**20,
        "target_mb": {"layer": layer / 2**20, "embeddings": embeddings / 2**20, "hidden_states": hidden / 2**20,
                      "total": target},
        "runs": runs, "forward_only_met": met,
    }
    _finish(report, peak_markdown(report), Path(args.results or RESULTS / "streamed_peak"),
            None if args.work else work)
    return 0 if met else 1


def _finish(report: dict, table: str, out: Path, scratch: Path | None) -> None:
    """Write the results (JSON and markdown), print the table, remove a scratch folder made for the run."""
    from adaprune.io import write_text

    write_text(out.with_suffix(".json"), json.dumps(report, indent=1))
    write_text(out.with_suffix(".md"), table)
    print(table)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def peak_markdown(r: dict) -> str:
    s, t = r["settings"], r["target_mb"]
    lines = [
        "# Streamed scoring: peak memory per estimator",
        "",
        f"`{s['command']}`: `Pruner(empty_model(f), offload=f, estimators=E, fusion=\"fixed\").score(batches)` "
        f"on a random-init Llama ({s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']} heads / {s['kv_heads']} KV heads, vocabulary {s['vocab']}, {s['dtype']}; "
        f"{r['parameters'] / 1e6:.0f}M parameters, {r['model_mb']:.0f} MiB), calibration {s['calibration']}, "
        f"{s['threads']} thread(s), each run a fresh process. Peak: VmHWM, reset just before `score()`, minus the "
        "resident memory before it (the runtime). Torch code pages: mapped file pages still resident after "
        "the scoring, when no checkpoint page is mapped any more (library code the run touched first; counted "
        "in the peak). Anonymous / file: the split of the largest resident memory a 2 ms sampler saw "
        "(file: the checkpoint's mapped pages and that code).",
        "",
        f"Target for the forward-only estimators: one decoder layer {t['layer']:.1f} + embeddings "
        f"{t['embeddings']:.1f} + hidden states {t['hidden_states']:.1f} = **{t['total']:.1f} MiB**.",
        "",
        "| estimators | runtime MiB | peak above runtime MiB | of which torch code pages MiB | sampled at peak: "
        "anonymous / file MiB | within target | wall s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for estimators, runs in r["runs"].items():
        forward_only = "taylor" not in estimators.split("+")
        for run in runs:
            sampled = run["sampled_peak"]
            within = ("yes" if run["peak_above_runtime_mb"] <= t["total"] else "no") if forward_only else \
                "(gradient terms: not a target)"
            lines.append(f"| {estimators} | {run['runtime_mb']:.0f} | {run['peak_above_runtime_mb']:.1f} | "
                         f"{run['code_pages_mb']:.1f} | {sampled['RssAnon']:.0f} / {sampled['RssFile']:.0f} | "
                         f"{within} | {run['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


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
