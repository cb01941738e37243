"""Measure the dense SmolLM2-135M on every multiple-choice task in the data folder and choose the suite.

    OMP_NUM_THREADS=1 python benchmarks/suite_selection.py

Every task (``social_iqa`` and the twenty in ``bigbench/``) is scored on its first ``--limit`` items
(500; fewer where they would score more than ``--token-budget`` tokens, 60,000, counting prompt and choice
for every choice: on one CPU thread SmolLM2-135M scores a few hundred tokens a second, so the whole
measurement takes about 45 minutes), in the pruning papers' protocol (lm-eval's, ``--prompt plain``):
the item's input, then each choice scored as its continuation, the choices not listed in the prompt;
``--prompt bigbench`` uses BIG-bench's own zero-shot prompt instead (task prefix, the choices listed,
``adaprune.tools.suite``), and ``--compare`` scores the other format too, for comparison only.

History: the first run used BIG-bench's prompt and capped every task at 12,000 tokens, which left 70 Social
IQa items, too few to tell 0.40 from a chance of 0.33 by three standard errors (that takes about 200), and
no task passed. The second raised the cap to 60,000 tokens: Social IQa, 354 items, scored 0.384 with
BIG-bench's prompt (z = +1.9), while the plain format is the one pruning papers report (LLM-Pruner's and
the seed paper's suites run through lm-eval, which does not list the choices). So this selection uses
the papers' format, chosen on the dense model before any pruned model was scored; the rule is unchanged. The rule, fixed before measuring:

- metric: raw accuracy when every item offers the same labels (yes/no, True/False, ...), length-
  normalised accuracy when the choices are free text that differs per item (``adaprune.tools.suite.choose_metric``);
- baseline: the chance level (mean of #correct / #choices), or for fixed labels the better of that and
  always giving the most frequent right label (``suite.constant_baseline``);
- keep a task when its metric exceeds the baseline by at least 3 of its standard errors, with the
  task's own prompt format.

Writes benchmarks/results/suite_selection.{md,json} and the chosen suite to adaprune/suites/zero_shot.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaprune import io  # noqa: E402
from adaprune.tools.data import load_smollm2  # noqa: E402
from adaprune.tools.evaluate import multiple_choice  # noqa: E402
from adaprune.tools.suite import (SUITES_DIR, chance_level, choose_metric, constant_baseline,  # noqa: E402
                            default_data_dir, load_task_examples)

RESULTS = ROOT / "benchmarks" / "results"
Z = 3.0  # standard errors above the baseline
OTHER_PROMPT = {"plain": "bigbench", "bigbench": "plain"}  # what --compare scores besides the chosen format


def task_paths(data_dir: Path) -> list[str]:
    """Every task file of the data folder, relative to it: social_iqa first, then bigbench/* by name."""
    paths = ["social_iqa/task.json"] + sorted(str(p.relative_to(data_dir)) for p in data_dir.glob("bigbench/*/task.json"))
    return [p for p in paths if (data_dir / p).is_file()]


def items_within_budget(tokenizer, examples: list[dict], budget: int) -> int:
    """How many of the first items fit in ``budget`` scored tokens (prompt + choice, every choice); at least one."""
    total = 0
    for count, example in enumerate(examples):
        total += sum(len(tokenizer(example["input"] + " " + c)["input_ids"]) for c in example["choices"])
        if total > budget:
            return max(count, 1)
    return len(examples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=500, help="first N items of each task")
    parser.add_argument("--token-budget", type=int, default=60_000,
                        help="fewer items where the first --limit would score more tokens than this (all choices)")
    parser.add_argument("--prompt", choices=("plain", "bigbench"), default="plain",
                        help="the prompt format the rule is applied to (default: the papers' protocol)")
    parser.add_argument("--compare", action="store_true", help="also score the other prompt format, for comparison")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-write-suite", action="store_true", help="do not write adaprune/suites/zero_shot.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    paths = task_paths(data_dir)
    if args.tasks:
        wanted = set(args.tasks.split(","))
        paths = [p for p in paths if Path(p).parent.name in wanted]

    model, tokenizer = load_smollm2()
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    start_all = time.perf_counter()
    for path in paths:
        name = Path(path).parent.name
        row: dict = {"name": name, "path": path}
        limit = items_within_budget(tokenizer, load_task_examples(data_dir / path, prompt=args.prompt, limit=args.limit),
                                    args.token_budget)
        for prompt in (args.prompt, OTHER_PROMPT[args.prompt]) if args.compare else (args.prompt,):
            examples = load_task_examples(data_dir / path, prompt=prompt, limit=limit)
            start = time.perf_counter()
            scores = multiple_choice(model, tokenizer, examples)
            row[prompt] = {**scores, "seconds": round(time.perf_counter() - start, 1)}
        row["items"] = len(examples)
        row["chance"] = chance_level(examples)
        row["baseline"] = constant_baseline(examples)
        row["metric"] = choose_metric(examples)
        own = row[args.prompt]
        row["score"], row["score_stderr"] = own[row["metric"]], own[row["metric"] + "_stderr"]
        row["z"] = (row["score"] - row["baseline"]) / row["score_stderr"] if row["score_stderr"] else 0.0
        row["kept"] = row["z"] >= Z
        rows.append(row)
        io.write_text(RESULTS / "suite_selection.partial.json", json.dumps(rows, indent=1) + "\n")  # survives a kill
        print(f"{name:<22} n={row['items']:4d} chance {row['chance']:.3f} baseline {row['baseline']:.3f} "
              f"acc {own['accuracy']:.3f} norm {own['accuracy_norm']:.3f} [{row['metric']}] z={row['z']:+.1f} "
              f"{'KEEP' if row['kept'] else '-'} ({own['seconds']}s)", flush=True)
    seconds = time.perf_counter() - start_all

    command = "OMP_NUM_THREADS=1 python benchmarks/suite_selection.py " + " ".join(sys.argv[1:])
    kept = [r for r in rows if r["kept"]]
    suite = {
        "name": "zero_shot",
        "description": (f"Tasks where dense SmolLM2-135M beats the baseline by >= {Z:g} standard errors on the first "
                        f"{args.limit} items (or those within {args.token_budget} scored tokens), with the {args.prompt} prompt; metric by the label rule "
                        "(fixed labels: accuracy, free-text choices: accuracy_norm). Made by: " + command.strip()),
        "tasks": [{"name": r["name"], "path": r["path"], "metric": r["metric"], "limit": r["items"],
                   "chance": round(r["chance"], 6), "prompt": args.prompt} for r in kept],
    }
    result = {
        "command": command.strip(), "model": "SmolLM2-135M (adaprune.data.load_smollm2, float32)",
        "limit": args.limit, "token_budget": args.token_budget, "z": Z, "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "rule": ("metric: accuracy if every item has the same label set else accuracy_norm; baseline: chance, or for "
                 "fixed labels max(chance, most frequent right label); keep if (metric - baseline) >= 3 stderr"),
        "tasks": rows, "suite": suite,
    }
    if kept:
        own = [r["score"] for r in kept]
        result["dense_average"] = sum(own) / len(own)
    io.write_text(RESULTS / "suite_selection.json", json.dumps(result, indent=1) + "\n")
    io.write_text(RESULTS / "suite_selection.md", markdown(result, args.prompt, args.compare))
    if not args.no_write_suite and not args.tasks:
        write_suites(suite, rows, args.limit, args.prompt)
    (RESULTS / "suite_selection.partial.json").unlink(missing_ok=True)
    print(f"{len(kept)} of {len(rows)} tasks kept; dense average {result.get('dense_average', float('nan')):.4f}; "
          f"{seconds:.0f} s")
    return 0


def write_suites(suite: dict, rows: list[dict], limit: int, prompt: str) -> None:
    """``zero_shot.json`` (the kept tasks; only when some are kept: a suite is never empty) and
    ``candidates.json`` (every measured task with its item limit, metric and chance, to run the same
    protocol on all of them)."""
    if suite["tasks"]:
        io.write_text(SUITES_DIR / "zero_shot.json", json.dumps(suite, indent=1) + "\n")
    else:
        (SUITES_DIR / "zero_shot.json").unlink(missing_ok=True)
    candidates = {
        "name": "candidates",
        "description": ("Every multiple-choice task of the data folder, as measured for the zero_shot selection "
                        f"(first {limit} items or those within the token budget, the {prompt} prompt, metric by the "
                        "label rule); see benchmarks/results/suite_selection.md."),
        "tasks": [{"name": r["name"], "path": r["path"], "metric": r["metric"], "limit": r["items"],
                   "chance": round(r["chance"], 6), "prompt": prompt} for r in rows],
    }
    io.write_text(SUITES_DIR / "candidates.json", json.dumps(candidates, indent=1) + "\n")


def markdown(result: dict, prompt: str, compare: bool) -> str:
    """The measurement table, the rule and the chosen suite."""
    lines = [
        "# Zero-shot suite selection: dense SmolLM2-135M on every multiple-choice task",
        "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s, {result['threads']} thread, torch {result['torch']}).",
        "",
        f"First {result['limit']} items of each task (fewer where they would score more than {result['token_budget']:,} "
        "tokens, prompt and choice over all choices: the cost cap), "
        + ("the papers' (lm-eval's) format: the bare input, each choice scored as its continuation, the choices not "
           "listed" if prompt == "plain" else "BIG-bench's own zero-shot prompt (task prefix, input prefix, choices "
           "appended where the task says so, output prefix)") + ". acc: the choice with the highest log-likelihood; "
        "acc_norm: log-likelihood per character of ' ' + choice. Standard errors sqrt(p(1-p)/n). chance: mean over "
        "items of #correct / #choices; baseline: chance, or for tasks whose items all share one label set the better "
        "of that and always answering the most frequent right label.",
        "",
        f"Rule (fixed before measuring): {result['rule']}. z = (metric - baseline) / stderr.",
        "",
    ]
    header = "| task | items | chance | baseline | acc | acc_norm | metric | z | kept |"
    sep = "|---|---:|---:|---:|---:|---:|---|---:|---|"
    other = OTHER_PROMPT[prompt]
    if compare:
        header += f" {other} acc | {other} acc_norm |"
        sep += "---:|---:|"
    lines += [header, sep]
    for r in sorted(result["tasks"], key=lambda r: -r["z"]):
        own = r[prompt]
        line = (f"| {r['name']} | {r['items']} | {r['chance']:.3f} | {r['baseline']:.3f} | "
                f"{own['accuracy']:.3f} ± {own['accuracy_stderr']:.3f} | "
                f"{own['accuracy_norm']:.3f} ± {own['accuracy_norm_stderr']:.3f} | {r['metric']} | {r['z']:+.1f} | "
                f"{'**yes**' if r['kept'] else 'no'} |")
        if compare:
            p = r[other]
            line += f" {p['accuracy']:.3f} | {p['accuracy_norm']:.3f} |"
        lines.append(line)
    kept = result["suite"]["tasks"]
    if kept:
        lines += ["", f"Chosen suite `zero_shot` ({len(kept)} tasks, adaprune/suites/zero_shot.json): "
                  + ", ".join(f"{t['name']} ({t['metric']})" for t in kept) + "."]
    else:
        lines += ["", "No task passes the rule: the dense model is not clearly above its baseline on any of them, so "
                  "there is no `zero_shot` suite. Every measured task is in the suite `candidates` "
                  "(adaprune/suites/candidates.json)."]
    if "dense_average" in result:
        lines.append(f"Dense average of each task's metric: {result['dense_average']:.4f}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
