"""Deploy benchmark: SmolLM2-135M dense and pruned (20 %, 50 %) as GGUF files, run side by side in llama.cpp.

    python benchmarks/deploy_benchmark.py

Each model is pruned by the default Pruner (only `ratio` set), exported at f16 and q8_0, and every
file is run by llama.cpp (llama-cpp-python, the `llama` extra) in its own process, batch 1, 2
threads, the files in alternation round after round: prompt processing (a 128-token prompt) and
generation (64 tokens, greedy) in tokens/s (medians over rounds), the file size, the process's peak
resident memory, and the perplexity llama.cpp's logits give on the Wikipedia test text: the same
non-overlapping windows and tokens as `adaprune.tools.evaluate.perplexity`, which gives PyTorch's
(float32) on the same tokens. Targets (issue 12): at q8_0, generation speed-up >= 0.9 x the ratio of
bytes read per token (dense / pruned parameters, embeddings included) and prompt-processing
speed-up >= 0.8 x the FLOPs ratio; llama.cpp's f16 perplexity within 1 % of PyTorch's.
Writes benchmarks/results/deploy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.2, 0.5)
TYPES = ("f16", "q8_0")
THREADS = 2
PROMPT = 128  # prompt-processing tokens
GENERATE = 64  # generated tokens, after a 16-token prompt
SEQ_LEN = 128  # perplexity windows
CALIBRATION_SAMPLES = 32


# ---- the worker: one GGUF file in a fresh process ----------------------------------------------

def worker(args: argparse.Namespace) -> None:
    from adaprune.tools.llama_runtime import open_gguf  # weight repacking off: see there

    task = json.loads(Path(args.worker).read_text())
    llm = open_gguf(task["path"], n_ctx=512, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                    logits_all=task["kind"] == "perplexity", verbose=False)
    out: dict = {}
    if task["kind"] == "speed":
        prompt = task["tokens"][:PROMPT]
        llm.reset()
        llm.eval(prompt[:8])  # warm-up
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        out["pp_tokens_per_second"] = len(prompt) / (time.perf_counter() - start)
        llm.reset()
        llm.eval(prompt[:16])
        start = time.perf_counter()
        for _ in range(GENERATE):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        out["tg_tokens_per_second"] = GENERATE / (time.perf_counter() - start)
    else:
        seq_len = task["seq_len"]
        stream = np.array(task["tokens"], dtype=np.int64)
        windows = stream[: task["windows"] * seq_len].reshape(task["windows"], seq_len)
        nll = 0.0
        for window in windows:
            llm.reset()
            llm.eval(window.tolist())
            logits = np.array(llm.scores[: seq_len - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            nll += float((logz - logits[np.arange(seq_len - 1), window[1:]]).sum())
        out["nll"] = nll / (task["windows"] * (seq_len - 1))
        out["perplexity"] = math.exp(out["nll"])
    out["peak_rss_mb"] = peak_rss_mb()
    Path(task["out"]).write_text(json.dumps(out))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss, which a child
    inherits from the large parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(path: Path, kind: str, tokens: list[int], folder: Path, windows: int = 0) -> dict:
    task = folder / f"task-{path.stem}-{kind}.json"
    out = folder / f"out-{path.stem}-{kind}.json"
    task.write_text(json.dumps({"path": str(path), "kind": kind, "tokens": tokens, "windows": windows,
                                "seq_len": SEQ_LEN, "out": str(out)}))
    subprocess.run([sys.executable, __file__, "--worker", str(task)], check=True)
    return json.loads(out.read_text())


# ---- the benchmark -----------------------------------------------------------------------------

def flops_per_token(model, context: int) -> float:
    """Multiply-adds x 2 per token of a `context`-token prompt: every Linear (lm_head included) and attention."""
    from adaprune import unit_table

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, __import__("torch").nn.Linear))
    attention = sum(4 * s.attention.num_heads * s.attention.head_dim * context / 2 for s in unit_table(model).shapes)
    return 2 * linear + attention


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds (files in alternation)")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows of 128 tokens")
    parser.add_argument("--out", default=str(RESULTS / "deploy"), help="results path without suffix")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import copy

    import torch

    from adaprune import Pruner, export_gguf
    from adaprune.tools.data import (SMOLLM2_GGUF, SMOLLM2_MODULE, SMOLLM2_PIP, _package_dir, load_smollm2,
                                     test_token_stream, token_batches, wiki_texts)
    from adaprune.tools.evaluate import perplexity

    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = _package_dir(SMOLLM2_MODULE, SMOLLM2_PIP) / SMOLLM2_GGUF
    dense, tokenizer = load_smollm2()
    stream = test_token_stream(tokenizer)
    batches = token_batches(tokenizer, wiki_texts("calibration"), seq_len=128, num_samples=CALIBRATION_SAMPLES,
                            batch_size=4)
    models = {"dense": dense}
    for ratio in RATIOS:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        pruner = Pruner(model, ratio=ratio, progress=False)
        pruner.apply(pruner.plan(batches))
        print(f"pruned {ratio:.0%} in {time.perf_counter() - start:.0f} s", flush=True)
        models[f"pruned {ratio:.0%}"] = model

    rows: dict[str, dict] = {}
    folder = Path(tempfile.mkdtemp(prefix="adaprune-deploy-"))
    files = {}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        ppl = perplexity(model, stream, seq_len=SEQ_LEN, max_windows=args.windows)
        rows[name] = {"params": params, "flops_per_token": flops_per_token(model, PROMPT),
                      "pytorch_perplexity": ppl["perplexity"], "tokens": ppl["tokens"]}
        for dtype in TYPES:
            path = export_gguf(model, tokenizer, folder / f"{name.replace(' ', '-').replace('%', '')}-{dtype}.gguf",
                               dtype=dtype, source_gguf=source)
            files[(name, dtype)] = path
            print(f"exported {path.name} ({path.stat().st_size / 2**20:.1f} MiB)", flush=True)
    del models

    tokens = stream.tolist()
    speed = {key: [] for key in files}
    for round_ in range(args.rounds):  # files in alternation: a noisy machine slows all alike
        for key, path in files.items():
            speed[key].append(run_worker(path, "speed", tokens[:PROMPT], folder))
        print(f"speed round {round_ + 1}/{args.rounds} done", flush=True)
    results = []
    for (name, dtype), path in files.items():
        ppl = run_worker(path, "perplexity", tokens[: args.windows * SEQ_LEN], folder, windows=args.windows)
        runs = speed[(name, dtype)]
        results.append({
            "model": name, "type": dtype, "params": rows[name]["params"], "file_mb": path.stat().st_size / 2**20,
            "pp_tokens_per_second": statistics.median(r["pp_tokens_per_second"] for r in runs),
            "tg_tokens_per_second": statistics.median(r["tg_tokens_per_second"] for r in runs),
            "peak_rss_mb": max([r["peak_rss_mb"] for r in runs] + [ppl["peak_rss_mb"]]),
            "llama_cpp_perplexity": ppl["perplexity"], "pytorch_perplexity": rows[name]["pytorch_perplexity"],
            "flops_per_token": rows[name]["flops_per_token"],
        })
    for row in results:
        base = next(r for r in results if r["model"] == "dense" and r["type"] == row["type"])
        row["bytes_ratio"] = base["params"] / row["params"]
        row["flops_ratio"] = base["flops_per_token"] / row["flops_per_token"]
        row["tg_speedup"] = row["tg_tokens_per_second"] / base["tg_tokens_per_second"]
        row["pp_speedup"] = row["pp_tokens_per_second"] / base["pp_tokens_per_second"]
        row["perplexity_gap"] = row["llama_cpp_perplexity"] / row["pytorch_perplexity"] - 1
    targets = []
    for row in results:
        if row["model"] != "dense" and row["type"] == "q8_0":
            targets.append({"target": f"{row['model']} q8_0 generation speed-up >= 0.9 x bytes ratio",
                            "value": row["tg_speedup"], "bound": 0.9 * row["bytes_ratio"],
                            "met": row["tg_speedup"] >= 0.9 * row["bytes_ratio"]})
            targets.append({"target": f"{row['model']} q8_0 prompt speed-up >= 0.8 x FLOPs ratio",
                            "value": row["pp_speedup"], "bound": 0.8 * row["flops_ratio"],
                            "met": row["pp_speedup"] >= 0.8 * row["flops_ratio"]})
        if row["type"] == "f16":
            targets.append({"target": f"{row['model']} f16 llama.cpp perplexity within 1% of PyTorch",
                            "value": row["perplexity_gap"], "bound": 0.01, "met": abs(row["perplexity_gap"]) <= 0.01})
    import llama_cpp

    report = {"settings": {"threads": THREADS, "batch": 1, "prompt_tokens": PROMPT, "generated_tokens": GENERATE,
                           "rounds": args.rounds, "perplexity_windows": args.windows, "seq_len": SEQ_LEN,
                           "pruner": "Pruner(model, ratio=r) defaults", "llama_cpp_python": llama_cpp.__version__,
                           "repacking": "off (use_extra_bufts=False: q8_0 repacked for AMX crashes on this CPU)",
                           "command": "python benchmarks/deploy_benchmark.py"},
              "results": results, "targets": targets}
    out = Path(args.out)
    from adaprune.io import write_text

    write_text(out.with_suffix(".json"), json.dumps(report, indent=1))
    write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Deploy benchmark: SmolLM2-135M in llama.cpp",
        "",
        f"`{s['command']}` (llama-cpp-python {s['llama_cpp_python']}; batch 1, {s['threads']} threads; "
        f"weight repacking {s['repacking']}; prompt {s['prompt_tokens']} tokens, generation {s['generated_tokens']} tokens; medians of {s['rounds']} "
        f"rounds, the files in alternation; perplexity on {s['perplexity_windows']} windows of {s['seq_len']} "
        "Wikipedia test tokens, llama.cpp's logits vs PyTorch float32 on the same tokens).",
        "",
        "| model | type | params | file MiB | peak RSS MiB | prompt tok/s | gen tok/s | prompt speed-up (FLOPs ratio) "
        "| gen speed-up (bytes ratio) | ppl llama.cpp | ppl PyTorch | gap |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['type']} | {r['params'] / 1e6:.1f}M | {r['file_mb']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {r['pp_tokens_per_second']:.0f} | {r['tg_tokens_per_second']:.1f} | {r['pp_speedup']:.2f}x "
            f"({r['flops_ratio']:.2f}x) | {r['tg_speedup']:.2f}x ({r['bytes_ratio']:.2f}x) "
            f"| {r['llama_cpp_perplexity']:.2f} | {r['pytorch_perplexity']:.2f} | {r['perplexity_gap']:+.2%} |")
    lines += ["", "| target | value | bound | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        fmt = "{:+.2%}" if "perplexity" in t["target"] else "{:.2f}x"
        lines.append(f"| {t['target']} | {fmt.format(t['value'])} | {fmt.format(t['bound'])} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
