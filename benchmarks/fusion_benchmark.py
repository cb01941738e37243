"""Coarse, fine, fixed and adaptive fusion, and LLM-Pruner's recipe, on SmolLM2-135M, side by side.

    python benchmarks/fusion_benchmark.py            # the full benchmark (make bench)
    python benchmarks/fusion_benchmark.py --quick    # a smoke run: tiny sizes, minutes

For each ratio (fraction of the prunable parameters removed, no fine-tuning afterwards) and each
allocation (uniform, global), five fusions of Taylor importance are compared:

1. ``coarse``: vector-wise Taylor, |sum of w*g| over the unit;
2. ``fine (1st order)``: element-wise Taylor, sum of |w*g|;
3. ``fine (Fisher)``: element-wise with the second-order Fisher term;
4. ``fixed 50/50``: coarse and fine (Fisher) averaged, the same blend everywhere;
5. ``adaptive``: the default policy, a blend per site trained on the calibration batches;

plus LLM-Pruner's recipe as published, reproduced with adaprune's estimators: element-wise
first-order Taylor from one gradient of 10 samples of 64 tokens, the same ratio in every pruned
layer (uniform), the first four and the last two layers left whole (``layers="4:-2"``).

Calibration runs once per recipe: one pass gives the coarse score and both fine scores (two
Taylor estimators share the pass); every configuration plans from those scores on a fresh copy
of the dense model. Text: the disjoint calibration and test splits of the Wikipedia package.
Reported per configuration: test perplexity (windows of 128 tokens), Social IQa accuracy (raw and
length-normalised, first items of the task, with standard errors), parameters removed, pruning wall
time (planning + slicing; the shared calibration pass is listed separately) and the peak resident
memory while pruning. Results go to benchmarks/results/fusion.{json,md,png}, rewritten after
every configuration so that an interrupted run leaves what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads of
# one process starve the other's (a forward pass measured 3.5x slower with the default policy).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from adaprune import Pruner
from adaprune.tools.data import load_smollm2, test_token_stream, token_batches, wiki_texts
from adaprune.estimators.taylor import TaylorEstimator
from adaprune.tools.evaluate import multiple_choice, perplexity

RESULTS = Path(__file__).resolve().parent / "results"
SOCIAL_IQA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "social_iqa" / "task.json"
SEQ_LEN = 128
FUSIONS = {  # label -> (fusion policy, which fine score the candidates carry, fusion options)
    "coarse": ("coarse", "fisher", {}),
    "fine (1st order)": ("fine", "first", {}),
    "fine (Fisher)": ("fine", "fisher", {}),
    "fixed 50/50": ("fixed", "fisher", {"coarse": 0.5}),
    "adaptive": ("adaptive", "fisher", {}),
}
LLM_PRUNER = "LLM-Pruner recipe"
ADAPTIVE_LLM_LAYERS = "adaptive, layers 4:-2"  # adaptive under LLM-Pruner's allocation, for a like-for-like row


class FirstOrderTaylor(TaylorEstimator):
    """Taylor with ``order=1`` under a name of its own, so that it shares one pass with ``order=2``."""

    name = "taylor_first_order"


class PeakRSS:
    """The highest resident set size of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def calibrate(model, batches, estimators) -> tuple[dict, float]:
    """One calibration pass for `estimators`; returns the scores and its wall time."""
    start = time.perf_counter()
    scores = dict(Pruner(model, estimators=estimators, progress=True).score(batches))
    return scores, time.perf_counter() - start


def evaluate(model, tokenizer, test_ids: torch.Tensor, args) -> dict[str, Any]:
    ppl = perplexity(model, test_ids, seq_len=SEQ_LEN, progress=True)
    result = {"perplexity": ppl["perplexity"], "test_tokens": ppl["tokens"]}
    if args.mc_items:
        mc = multiple_choice(model, tokenizer, SOCIAL_IQA, limit=args.mc_items, progress=True)
        result.update({key: mc[key] for key in ("accuracy", "accuracy_stderr", "accuracy_norm",
                                                "accuracy_norm_stderr", "items")})
    return result


def run_config(dense, tokenizer, test_ids, args, *, label, ratio, allocation, fusion, options, scores, order,
               calibration, layers=None, evaluated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Prune a fresh copy of the dense model with one configuration and evaluate it.

    `evaluated` maps a plan's removals to its evaluation: a configuration that removes exactly
    the same units as one before it gives the same model, and reuses that evaluation.
    """
    model = copy.deepcopy(dense)
    with PeakRSS() as memory:
        start = time.perf_counter()
        # The estimator named here is only recorded in the plan: the scores come from the shared pass.
        # Reconstruction off: this benchmark compares the fusions alone (quality_benchmark.py has the rest).
        pruner = Pruner(model, ratio=ratio, estimators=[{"name": "taylor", "order": order}], fusion=fusion, reconstruct=False,
                        fusion_options=options, allocation=allocation, layers=layers, mode="slice", progress=True)
        plan = pruner.plan(calibration, scores=scores)
        pruner.apply(plan)
        seconds = time.perf_counter() - start
    result = {"config": label, "ratio": ratio, "allocation": allocation, "fusion": fusion, "options": options,
              "layers": layers, "prune_seconds": round(seconds, 2), "peak_rss_mb": round(memory.peak / 2**20, 1),
              "params_after": plan.params["total_after"],
              "prunable_fraction_removed": plan.params.get("prunable_fraction_removed"),
              "kept": plan.summary()["layers"]}
    if fusion == "adaptive":
        result["fusion_sites"] = plan.fusion["sites"]
        result["training"] = plan.fusion.get("training", {})
    removals = json.dumps([[layer.remove_kv_groups, layer.remove_heads, layer.remove_channels,
                            layer.remove_attention, layer.remove_mlp] for layer in plan.layers])
    if removals in evaluated:
        result.update(evaluated[removals], same_plan_as=evaluated[removals]["evaluated_as"])
    else:
        evaluated[removals] = {**evaluate(model, tokenizer, test_ids, args), "evaluated_as": f"{ratio:g} {allocation} {label}"}
        result.update(evaluated[removals])
    del model
    return result


# ---- reporting -------------------------------------------------------------------------------------
def _pct(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Each adaptive row against each rival of its ratio: the other fusions under the same
    allocation, and LLM-Pruner's recipe. Perplexity must be lower; accuracy (raw and normalised)
    no lower than the rival's beyond one standard error."""
    lines = []
    for row in rows:
        if not row["config"].startswith("adaptive"):
            continue
        rivals = [r for r in rows if r["ratio"] == row["ratio"] and not r["config"].startswith("adaptive")
                  and (r["config"] == LLM_PRUNER or (r["allocation"] == row["allocation"] and not row["layers"]))]
        outcomes = []
        for rival in rivals:
            lower = row["perplexity"] < rival["perplexity"]
            accuracy_ok = all(row[key] >= rival[key] - row[key + "_stderr"]
                              for key in ("accuracy", "accuracy_norm") if key in row and key in rival)
            outcomes.append(f"{'beats' if lower and accuracy_ok else 'does NOT beat'} {rival['config']} "
                            f"({rival['perplexity']:.1f}{'' if accuracy_ok else ', accuracy lower beyond one stderr'})")
        where = f"{row['allocation']}" + (f", layers {row['layers']}" if row["layers"] else ", all layers")
        lines.append(f"- {row['ratio']:g}, {where}: adaptive {row['perplexity']:.1f} " + "; ".join(outcomes) + ".")
    return lines


def write_results(payload: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    rows = payload["results"]
    meta = payload["meta"]
    lines = [
        "# Fusion benchmark: SmolLM2-135M-Instruct, no fine-tuning",
        "",
        f"Command: `{meta['command']}`. Calibration: {meta['calibration']}. Test: {meta['test']}. "
        f"Social IQa: first {meta['mc_items']} items. Threads: {meta['threads']}. "
        f"Wall time so far: {meta['wall_seconds'] / 60:.1f} min ({'finished' if meta['finished'] else 'interrupted or running'}).",
        "",
        "Perplexity on the Wikipedia test split (lower is better); accuracy in % with one standard error. "
        "Prune time is planning (fusion, allocation) plus slicing; the shared calibration passes "
        f"took {meta['calibration_seconds']}. Peak RSS is the process's resident memory while pruning.",
        "",
        "| ratio | allocation | configuration | test ppl | SIQA acc | SIQA acc_norm | params after | removed (of prunable) | prune s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['ratio']:g} | {row['allocation']}{' ' + row['layers'] if row.get('layers') else ''} | "
            f"{row['config']} | {row['perplexity']:.2f} | "
            f"{_pct(row.get('accuracy'), row.get('accuracy_stderr'))} | "
            f"{_pct(row.get('accuracy_norm'), row.get('accuracy_norm_stderr'))} | {row['params_after']:,} | "
            f"{_pct(row.get('prunable_fraction_removed'))} | {row['prune_seconds']} | {row['peak_rss_mb']} |")
    lines += ["", "## Verdict", "", *(verdicts(rows) or ["- (no adaptive row yet)"])]
    adaptive = [r for r in rows if r["config"].startswith("adaptive")]
    if adaptive:
        lines += ["", "## Adaptive blend: weight of the coarse score per layer", "",
                  "One column per run; `kv` = KV-group sites, `ch` = MLP-channel sites (the levels that were pruned).", ""]
        header = "| layer | " + " | ".join(f"{r['ratio']:g} {r['allocation']}{' 4:-2' if r['layers'] else ''} kv | ch"
                                          for r in adaptive) + " |"
        lines += [header, "|---|" + "---|---|" * len(adaptive)]
        layers = max(s["layer"] for s in adaptive[0]["fusion_sites"]) + 1
        for layer in range(layers):
            cells = []
            for r in adaptive:
                for level in ("kv_group", "channel"):
                    site = next((s for s in r["fusion_sites"] if s["layer"] == layer and s["level"] == level), {})
                    weight = site.get("weights", {}).get("taylor/coarse")
                    cells.append("–" if weight is None else f"{weight:.2f}")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines += ["", "Training (calibration KL to the dense model with the units removed, on the check batches):", ""]
        for r in adaptive:
            checks = r["training"].get("hard_checks", [])
            if checks:
                lines.append(f"- {r['ratio']:g} {r['allocation']} {r['config']}: " + ", ".join(
                    f"step {c['step']}: {c['loss']:.3f}" for c in checks) + f"; kept step {r['training']['chosen_step']}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(rows, out.with_suffix(".png"))


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] > 0})
    if not ratios:
        return
    figure, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4), squeeze=False)
    for axis, ratio in zip(axes[0], ratios):
        chosen = [r for r in rows if r["ratio"] == ratio]
        labels = [r["config"] + ("" if r["config"] == LLM_PRUNER else f"\n{r['allocation']}") for r in chosen]
        colours = ["tab:red" if r["config"].startswith("adaptive") else "tab:grey" for r in chosen]
        axis.bar(range(len(chosen)), [r["perplexity"] for r in chosen], color=colours)
        axis.set_yscale("log")
        axis.set_xticks(range(len(chosen)), labels, rotation=70, fontsize=7)
        axis.set_title(f"{ratio:.0%} of prunable parameters removed")
        axis.set_ylabel("test perplexity (log)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--allocations", default="uniform,global")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration samples of 128 tokens")
    parser.add_argument("--test-windows", type=int, default=160, help="test windows of 128 tokens (160: ~20k tokens)")
    parser.add_argument("--mc-items", type=int, default=500, help="Social IQa items (0 skips it)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--adaptive-steps", type=int, default=None, help="override the adaptive policy's steps")
    parser.add_argument("--skip-llm-pruner", action="store_true")
    parser.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge the results of runs over disjoint ratios (e.g. run in parallel) into --out")
    parser.add_argument("--out", default=str(RESULTS / "fusion"), help="results path without extension")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that everything runs")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.quick:
        args.calib_samples, args.test_windows, args.mc_items, args.adaptive_steps = 4, 4, 10, 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()

    dense, tokenizer = load_smollm2()
    texts = wiki_texts("calibration")
    calibration = token_batches(tokenizer, texts, seq_len=SEQ_LEN, num_samples=args.calib_samples)
    # LLM-Pruner: 10 samples of 64 tokens, one gradient over all of them (one batch).
    llm_pruner_calibration = token_batches(tokenizer, texts, seq_len=64, num_samples=10, batch_size=10)
    test_ids = test_token_stream(tokenizer, max_tokens=args.test_windows * SEQ_LEN)

    scores, seconds = calibrate(dense, calibration, [{"name": "taylor", "order": 2}, FirstOrderTaylor(order=1)])
    by_fine = {"fisher": {"taylor": scores["taylor"]},
               "first": {"taylor": {"coarse": scores["taylor"]["coarse"],
                                    "fine": scores["taylor_first_order"]["fine"]}}}
    calibration_seconds = {"adaprune (coarse + both fine, one pass)": round(seconds, 1)}
    llm_scores = None
    if not args.skip_llm_pruner:
        llm_scores, seconds = calibrate(dense, llm_pruner_calibration, ["taylor"])
        calibration_seconds["LLM-Pruner recipe"] = round(seconds, 1)

    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)",
            "calibration": f"{args.calib_samples} x {SEQ_LEN} tokens from the Wikipedia calibration split "
                           "(LLM-Pruner recipe: 10 x 64)",
            "test": f"{test_ids.numel() // SEQ_LEN} windows of {SEQ_LEN} tokens of the Wikipedia test split",
            "mc_items": args.mc_items, "threads": args.threads, "machine": platform.processor() or platform.machine(),
            "calibration_seconds": calibration_seconds, "finished": False, "wall_seconds": 0.0,
            "torch": torch.__version__}
    rows: list[dict[str, Any]] = []
    out = Path(args.out)

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        meta["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_results({"meta": meta, "results": rows}, out)
        print(f"[{meta['wall_seconds'] / 60:5.1f} min] {row['ratio']:g} {row['allocation']:7s} {row['config']:18s} "
              f"ppl {row['perplexity']:.2f} acc {_pct(row.get('accuracy'))} acc_norm {_pct(row.get('accuracy_norm'))}",
              flush=True)

    evaluated: dict[str, dict[str, Any]] = {}
    dense_row = {"config": "dense", "ratio": 0.0, "allocation": "–", "fusion": "–", "prune_seconds": 0,
                 "peak_rss_mb": round(_rss() / 2**20, 1), "params_after": sum(p.numel() for p in dense.parameters()),
                 "prunable_fraction_removed": 0.0}
    if not args.skip_dense:
        dense_row.update(evaluate(dense, tokenizer, test_ids, args))
        record(dense_row)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for allocation in args.allocations.split(","):
            for label, (fusion, fine, options) in FUSIONS.items():
                if fusion == "adaptive" and args.adaptive_steps is not None:
                    options = {**options, "steps": args.adaptive_steps}
                record(run_config(dense, tokenizer, test_ids, args, label=label, ratio=ratio, allocation=allocation,
                                  fusion=fusion, options=options, scores=by_fine[fine],
                                  order=2 if fine == "fisher" else 1,
                                  calibration=calibration if fusion == "adaptive" else None, evaluated=evaluated))
        if llm_scores is not None:
            record(run_config(dense, tokenizer, test_ids, args, label=LLM_PRUNER, ratio=ratio, allocation="uniform",
                              fusion="fine", options={}, scores=llm_scores, order=1, calibration=None,
                              layers="4:-2", evaluated=evaluated))
            options = {} if args.adaptive_steps is None else {"steps": args.adaptive_steps}
            record(run_config(dense, tokenizer, test_ids, args, label=ADAPTIVE_LLM_LAYERS, ratio=ratio,
                              allocation="uniform", fusion="adaptive", options=options, scores=by_fine["fisher"],
                              order=2, calibration=calibration, layers="4:-2", evaluated=evaluated))
    meta["finished"] = True
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_results({"meta": meta, "results": rows}, out)
    print(f"done in {meta['wall_seconds'] / 60:.1f} min: {out.with_suffix('.md')}")
    return 0


def merge(paths: list[str], out: Path) -> int:
    """One table from runs over disjoint ratios (the first run's metadata, the runs' rows in ratio order)."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    meta = dict(payloads[0]["meta"])
    meta["command"] = " + ".join(p["meta"]["command"] for p in payloads) + " (merged)"
    meta["wall_seconds"] = max(p["meta"]["wall_seconds"] for p in payloads)
    meta["finished"] = all(p["meta"]["finished"] for p in payloads)
    rows = sorted((row for p in payloads for row in p["results"]), key=lambda r: r["ratio"])
    write_results({"meta": meta, "results": rows}, out)
    print(f"merged {len(rows)} rows into {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
