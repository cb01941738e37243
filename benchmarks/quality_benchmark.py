"""Quality per parameter, side by side in one run: adaprune's default against FLAP's and LLM-Pruner's recipes.

    python benchmarks/quality_benchmark.py                      # both ratios, everything (about an hour on 2 cores)
    python benchmarks/quality_benchmark.py --quick              # a smoke run: tiny sizes, minutes

SmolLM2-135M-Instruct; calibration from the Wikipedia calibration split; evaluation on the
disjoint Wikipedia test split and on the two texts of ../shared/data/text/ (other domains, test
only), in windows of 128 and 512 tokens, and on the zero-shot suite (adaprune/suites). Per
ratio (fraction of the prunable parameters removed):

1. ``default, no reconstruction``: adaprune's defaults with ``reconstruct=False``;
2. ``default``: adaprune's defaults (weight reconstruction on);
3. ``default + recovery``: then LoRA recovery (adaprune.recover) on calibration-split text;
4. ``FLAP recipe``: fluctuation scores, global allocation (FLAP's adaptive structure), and the
   compensation FLAP's bias gives where the model has one (Llama has none: reconstruction
   without bias stands in; see the table's note);
5. ``LLM-Pruner recipe``: element-wise first-order Taylor from 10 x 64 tokens, the same ratio in
   layers 4:-2, no reconstruction; 6. ``LLM-Pruner recipe + LoRA``: then its LoRA recovery.

Every configuration prunes a fresh copy of the dense model. Results: benchmarks/results/quality.{json,md},
rewritten after every configuration so that an interrupted run leaves what it finished.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: the 2 cores are shared
import sys
import time
from pathlib import Path
from typing import Any

import torch

from adaprune import Pruner, RecoveryReport, recover
from adaprune.io import write_text
from adaprune.tools.data import _token_stream, load_smollm2, test_token_stream, token_batches, wiki_texts
from adaprune.tools.evaluate import perplexity
from adaprune.tools.suite import evaluate_suite, suite_loglikelihoods

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_benchmark import PeakRSS  # noqa: E402  (the same memory probe)

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXTS = {"wiki": None, "debian": SHARED / "text" / "debian-reference.txt", "fortunes": SHARED / "text" / "fortunes.txt"}


def streams(tokenizer, args) -> dict[str, torch.Tensor]:
    """Token streams of each evaluation text, long enough for the windows asked."""
    needed = max(args.windows * 128, args.windows_512 * 512)
    out = {"wiki": test_token_stream(tokenizer, max_tokens=needed)}
    for name, path in TEXTS.items():
        if path is not None and path.is_file():
            text = path.read_text(errors="replace")
            documents = [part for part in text.split("\n\n") if part.strip()]
            out[name] = torch.tensor(_token_stream(tokenizer, documents, max_tokens=needed), dtype=torch.long)
    return out


def suite_row(suite: dict[str, Any]) -> dict[str, Any]:
    """The suite's columns of a results row; against the dense model, its paired difference and agreement too."""
    row = {"suite_average": suite["average"], "suite_average_stderr": suite["average_stderr"],
           "suite": {r["name"]: {k: r[k] for k in ("metric", "score", "accuracy", "accuracy_norm", "items",
                                                   "score_delta", "score_delta_stderr", "agreement") if k in r}
                     for r in suite["tasks"]}}
    if "average_delta" in suite:
        row.update(suite_delta=suite["average_delta"], suite_delta_stderr=suite["average_delta_stderr"],
                   suite_agreement=suite["average_agreement"])
    return row


def evaluate(model, tokenizer, texts: dict[str, torch.Tensor], args, reference=None) -> dict[str, Any]:
    """Perplexities and the suite; `reference` (the dense model's `suite_loglikelihoods`, scored once for all
    rows) adds the suite's paired difference to it."""
    result: dict[str, Any] = {}
    for name, ids in texts.items():
        result[f"{name}_ppl128"] = perplexity(model, ids, seq_len=128, max_windows=args.windows)["perplexity"]
        if args.windows_512:
            result[f"{name}_ppl512"] = perplexity(model, ids, seq_len=512, max_windows=args.windows_512,
                                                  batch_size=2)["perplexity"]
    if args.suite_items:
        result.update(suite_row(evaluate_suite(model, tokenizer, "zero_shot", limit=args.suite_items,
                                               reference=reference)))
    return result


def recover_model(model, dense, batches, args) -> dict[str, Any]:
    start = time.perf_counter()
    report = RecoveryReport()
    recover(model, batches, steps=args.recovery_steps, objective=args.recovery_objective, lr=args.recovery_lr,
            batch_size=args.recovery_batch, teacher=dense if args.recovery_objective == "kl" else None,
            generated=args.recovery_generated, progress=True, report=report)
    record = report.to_dict()
    return {"recovery_seconds": round(time.perf_counter() - start, 1),
            "recovery": {k: record[k] for k in ("steps", "tokens", "seconds", "settings", "losses")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration samples of 128 tokens")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows of 128 tokens per text")
    parser.add_argument("--windows-512", type=int, default=16, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--suite-items", type=int, default=100, help="items per zero-shot task (0 skips it)")
    parser.add_argument("--reconstruct-samples", type=int, default=128,
                        help="calibration rows the reconstruction reads (the plan reads --calib-samples)")
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--recovery-objective", default="kl", choices=("kl", "lm"))
    parser.add_argument("--recovery-batch", type=int, default=1, help="calibration rows per recovery step")
    parser.add_argument("--recovery-lr", type=float, default=inspect.signature(recover).parameters["lr"].default)
    parser.add_argument("--recovery-samples", type=int, default=800,
                        help="recovery text: windows of 128 tokens of the Wikipedia calibration split, as "
                             "`adaprune recover` takes by default (0: the calibration batches themselves)")
    parser.add_argument("--recovery-generated", type=int, default=None,
                        help="windows sampled from the dense model that join the recovery text (with kl); "
                             "default: recover()'s own (half as many as --recovery-samples)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configuration labels")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(RESULTS / "quality"))
    parser.add_argument("--save", default=None, help="also save every pruned model under this folder")
    parser.add_argument("--add-suite", action="store_true",
                        help="only evaluate the zero-shot suite on the models --save kept, into the --out results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        (args.calib_samples, args.windows, args.windows_512, args.suite_items, args.recovery_steps,
         args.recovery_samples, args.reconstruct_samples) = 8, 4, 1, 5, 4, 8, 8
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.add_suite:
        return add_suite(args)
    started = time.perf_counter()
    dense, tokenizer = load_smollm2()
    texts_ = wiki_texts("calibration")
    calibration = token_batches(tokenizer, texts_, seq_len=128, num_samples=args.calib_samples, batch_size=4)
    llm_pruner_calibration = token_batches(tokenizer, texts_, seq_len=64, num_samples=10, batch_size=10)
    # The reconstruction reads more rows than the plan (its default: 128); the first are the plan's own.
    reconstruction_rows = token_batches(tokenizer, texts_, seq_len=128, batch_size=4,
                                        num_samples=max(args.calib_samples, args.reconstruct_samples))
    recovery_text = calibration if not args.recovery_samples else token_batches(
        tokenizer, texts_, seq_len=128, num_samples=args.recovery_samples, batch_size=args.recovery_samples)
    texts = streams(tokenizer, args)
    sampled = ("" if args.recovery_objective != "kl" or args.recovery_generated == 0 else
               f" and {args.recovery_generated} windows sampled from the dense model" if args.recovery_generated
               else " and half as many windows sampled from the dense model")  # recover()'s default
    meta = {"command": " ".join(["quality_benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
            "calibration": f"{args.calib_samples} x 128 Wikipedia calibration tokens for the plan (LLM-Pruner: 10 x 64), "
                           f"{max(args.calib_samples, args.reconstruct_samples)} x 128 for the reconstruction",
            "recovery": f"{args.recovery_steps} steps of {args.recovery_batch} x 128 tokens, lr {args.recovery_lr:g}, "
                        f"{args.recovery_objective}, on " + (f"{args.recovery_samples} windows of the Wikipedia "
                        "calibration split" if args.recovery_samples else "the calibration batches") + sampled,
            "evaluation": f"{args.windows} windows of 128 and {args.windows_512} of 512 tokens per text; "
                          f"suite: first {args.suite_items} items per task", "threads": args.threads,
            "defaults": Pruner.__init__.__defaults__ and None, "finished": False}
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    wanted = set(args.configs.split(",")) if args.configs else None

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        meta["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_results({"meta": meta, "results": rows}, out)
        print(f"[{meta['wall_seconds'] / 60:5.1f} min] {row['ratio']:g} {row['config']:28s} "
              + " ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith(("ppl128", "average"))), flush=True)

    with PeakRSS() as memory:
        row = {"config": "dense", "ratio": 0.0, "params": sum(p.numel() for p in dense.parameters())}
        row.update(evaluate(dense, tokenizer, texts, args))
    record({**row, "peak_rss_mb": round(memory.peak / 2**20, 1), "saved": "dense"})
    dense_scores = None  # the dense model's choices on the suite's items, for every row's paired difference
    if args.suite_items:
        dense_scores = suite_loglikelihoods(dense, tokenizer, "zero_shot", limit=args.suite_items)

    def run(label: str, ratio: float, batches, recovered: str | None = None, unreconstructed: str | None = None,
            **settings) -> None:
        """Plan once with `settings`, apply to a fresh copy and evaluate; with `unreconstructed`, also apply the
        same plan without reconstruction; with `recovered`, also recover the pruned model and evaluate again."""
        if wanted and not wanted & {label, recovered, unreconstructed}:
            return
        start = time.perf_counter()
        planner = Pruner(dense, ratio=ratio, progress=True, **settings)
        plan = planner.plan(batches)
        planning = time.perf_counter() - start
        variants = [(unreconstructed, False)] if unreconstructed and (not wanted or unreconstructed in wanted) else []
        for name, reconstruct in variants + [(label, settings.get("reconstruct", True))]:
            model = copy.deepcopy(dense)
            with PeakRSS() as memory:
                start = time.perf_counter()
                pruner = Pruner(model, ratio=ratio, progress=True, **{**settings, "reconstruct": reconstruct})
                pruner.apply(plan, calibration=reconstruction_rows if batches is calibration else batches)
                row = {"config": name, "ratio": ratio, "prune_seconds": round(planning + time.perf_counter() - start, 1),
                       "params": sum(p.numel() for p in model.parameters()),
                       "prunable_fraction_removed": plan.params["prunable_fraction_removed"],
                       "settings": {**plan.settings, "stages": pruner.settings()["stages"]},
                       "stage_seconds": {**planner.timings, **pruner.timings}}
            finish(model, {**row, "peak_rss_mb": round(memory.peak / 2**20, 1)})
        if recovered:
            with PeakRSS() as memory:
                row = {**row, "config": recovered, **recover_model(model, dense, recovery_text, args)}
            finish(model, {**row, "peak_rss_mb": round(memory.peak / 2**20, 1)})
        del model

    def finish(model, row: dict[str, Any]) -> None:
        row.update(evaluate(model, tokenizer, texts, args, reference=dense_scores))
        if args.save:
            name = row["config"].replace(" ", "_").replace(",", "").replace("+", "and")
            folder = Path(args.save) / f"{row['ratio']:g}-{name}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            row["saved"] = str(folder)
        record(row)

    for ratio in [float(r) for r in args.ratios.split(",")]:
        run("default", ratio, calibration, recovered="default + recovery", unreconstructed="default, no reconstruction")
        run("FLAP recipe", ratio, calibration, estimators=["fluctuation"], fusion="coarse", allocation="global")
        run("LLM-Pruner recipe", ratio, llm_pruner_calibration, recovered="LLM-Pruner recipe + LoRA",
            estimators=["taylor"], fusion="fine", allocation="uniform", layers="4:-2", reconstruct=False)
    meta["finished"] = True
    write_results({"meta": meta, "results": rows}, out)
    return 0


def add_suite(args) -> int:
    """The zero-shot suite on every model a run saved, written into that run's results."""
    from transformers import AutoModelForCausalLM

    out = Path(args.out)
    payload = json.loads((out.parent / f"{out.name}.json").read_text())
    dense, tokenizer = load_smollm2()
    dense_scores = suite_loglikelihoods(dense, tokenizer, "zero_shot", limit=args.suite_items or None)
    for row in payload["results"]:
        if "saved" not in row or "suite_average" in row:
            continue
        model = dense if row["saved"] == "dense" else AutoModelForCausalLM.from_pretrained(
            row["saved"], trust_remote_code=True).eval()
        row.update(suite_row(evaluate_suite(model, tokenizer, "zero_shot", limit=args.suite_items or None,
                                            reference=None if model is dense else dense_scores)))
        write_results(payload, out)
        print(f"{row['ratio']:g} {row['config']}: suite {100 * row['suite_average']:.1f}", flush=True)
    return 0


def write_results(payload: dict[str, Any], out: Path) -> None:
    write_text(out.parent / f"{out.name}.json", json.dumps(payload, indent=1, default=str))
    rows = payload["results"]
    dense = next((r for r in rows if r["config"] == "dense"), None)
    columns = [k for k in ("wiki_ppl128", "wiki_ppl512", "debian_ppl128", "debian_ppl512", "fortunes_ppl128",
                           "fortunes_ppl512", "suite_average", "suite_delta") if any(k in r for r in rows)]
    lines = ["# Quality benchmark: SmolLM2-135M-Instruct", "", f"Command: `{payload['meta']['command']}`. "
             f"{payload['meta']['calibration']}; {payload['meta']['evaluation']}; recovery: "
             f"{payload['meta'].get('recovery', 'the calibration batches')}.", "",
             "Perplexity (lower is better) with its multiple of dense in brackets; suite: average accuracy; "
             "suite_delta: its difference to dense on the same items, with the paired standard error.", "",
             "| ratio | configuration | params | " + " | ".join(columns) + " | prune s | recovery s | peak RSS MB |",
             "|---|---|---:|" + "---:|" * len(columns) + "---:|---:|---:|"]
    for r in rows:
        cells = []
        for key in columns:
            value = r.get(key)
            if value is None:
                cells.append("–")
            elif key == "suite_average":
                cells.append(f"{100 * value:.1f}")
            elif key == "suite_delta":  # paired against dense on the same items; how often both answer alike
                cells.append(f"{100 * value:+.1f} ± {100 * r['suite_delta_stderr']:.1f} "
                             f"(same answer {100 * r['suite_agreement']:.0f} %)")
            else:
                cells.append(f"{value:.2f}" + (f" ({value / dense[key]:.2f}x)" if dense and key in dense else ""))
        lines.append(f"| {r['ratio']:g} | {r['config']} | {r['params']:,} | " + " | ".join(cells)
                     + f" | {r.get('prune_seconds', '–')} | {r.get('recovery_seconds', '–')} | {r.get('peak_rss_mb', '–')} |")
    write_text(out.parent / f"{out.name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
