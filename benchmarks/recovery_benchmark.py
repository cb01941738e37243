"""LoRA recovery on SmolLM2-135M: seconds per step, and perplexity before/after, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/recovery_benchmark.py timing
    OMP_NUM_THREADS=1 python benchmarks/recovery_benchmark.py quality --steps 200
    OMP_NUM_THREADS=1 python benchmarks/recovery_benchmark.py holdout --ratio 0.2

`timing` measures seconds per recovery step (objective lm and kl) for thread counts and batch sizes.
`quality` prunes SmolLM2 (Pruner(model, ratio=0.2) defaults, 32 x 128 Wikipedia calibration tokens),
then recovers copies of the pruned model with each objective on Wikipedia *calibration* text (never
the test split), recording the loss on a hold-out of the calibration split during training; and
measures perplexity (windows of 128) on the Wikipedia test split and on the first windows of the two
other-domain texts in ../shared/data/text (test only: no setting is chosen on them).
`holdout` compares recovery settings (steps, batch, lr, and windows sampled from the dense model
itself: `recover(generated=...)`) on the calibration hold-out alone: how the defaults of `recover`
were chosen. With `--dev` also on two dev sets that are no test set: the docstrings of Python's
standard library (domain shift) and Social IQa items 1354-1953 (the suite scores items 0-499).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from adaprune import Pruner, RecoveryReport, recover
from adaprune.tools.cli import read_texts
from adaprune.tools.data import _token_stream, load_smollm2, test_token_stream, token_batches, wiki_texts
from adaprune.tools.evaluate import perplexity
from adaprune.io import write_text

HOLD_OUT_TEXTS = 300  # the last calibration articles: the hold-out for choosing settings
OTHER_TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def split_calibration(tokenizer, seq_len: int, samples: int, hold_out: int):
    texts = wiki_texts("calibration")
    train = token_batches(tokenizer, texts[:-HOLD_OUT_TEXTS], seq_len=seq_len, num_samples=samples, batch_size=samples)
    held = token_batches(tokenizer, texts[-HOLD_OUT_TEXTS:], seq_len=seq_len, num_samples=hold_out, batch_size=8)
    return train, held


def pruned_smollm2(tokenizer, model):
    calibration = token_batches(tokenizer, wiki_texts("calibration"), seq_len=128, num_samples=32)
    pruner = Pruner(model, ratio=0.2, progress=False)
    start = time.perf_counter()
    pruner.apply(pruner.plan(calibration))
    return time.perf_counter() - start


def cmd_timing(args) -> dict:
    dense, tokenizer = load_smollm2()
    model = copy.deepcopy(dense)
    prune_seconds = pruned_smollm2(tokenizer, model)
    train, _ = split_calibration(tokenizer, 128, 64, 8)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch_size in args.batch_sizes:
            for objective in ("lm", "kl"):
                trial = copy.deepcopy(model)
                report = RecoveryReport()
                recover(trial, train, steps=args.steps, batch_size=batch_size, objective=objective,
                        teacher=dense if objective == "kl" else None, progress=False, report=report)
                # The first step warms up allocations: time the others.
                per_step = sum(report.step_seconds[1:]) / (report.steps - 1)
                rows.append({"threads": threads, "batch_size": batch_size, "seq_len": 128, "objective": objective,
                             "seconds_per_step": round(per_step, 3),
                             "tokens_per_second": round(batch_size * 128 / per_step, 1)})
                print(rows[-1], flush=True)
    return {"prune_seconds": round(prune_seconds, 1), "timing": rows}


def evaluate_all(model, tokenizer, streams) -> dict:
    return {name: round(perplexity(model, ids, seq_len=128, batch_size=8, max_windows=windows)["perplexity"], 3)
            for name, (ids, windows) in streams.items()}


def cmd_quality(args) -> dict:
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_smollm2()
    streams = {"wiki_test": (test_token_stream(tokenizer, max_tokens=args.windows * 128), args.windows)}
    for name in ("debian-reference", "fortunes"):
        ids = _token_stream(tokenizer, read_texts(str(OTHER_TEXTS / f"{name}.txt")), max_tokens=args.windows * 128)
        streams[name] = (torch.tensor(ids, dtype=torch.long), args.windows)
    result: dict = {"settings": vars(args) | {"func": None}, "perplexity": {}}
    result["perplexity"]["dense"] = evaluate_all(dense, tokenizer, streams)
    print("dense", result["perplexity"]["dense"], flush=True)
    pruned = copy.deepcopy(dense)
    result["prune_seconds"] = round(pruned_smollm2(tokenizer, pruned), 1)
    result["params"] = {"dense": sum(p.numel() for p in dense.parameters()),
                        "pruned": sum(p.numel() for p in pruned.parameters())}
    result["perplexity"]["pruned"] = evaluate_all(pruned, tokenizer, streams)
    print("pruned", result["perplexity"]["pruned"], flush=True)
    train, held = split_calibration(tokenizer, 128, args.samples, args.hold_out)
    result["recovery"] = {}
    for objective in args.objectives:
        for lr in args.lrs:
            model = copy.deepcopy(pruned)
            report = RecoveryReport()
            recover(model, train, steps=args.steps, rank=args.rank, lr=lr, batch_size=args.batch_size,
                    objective=objective, teacher=dense if objective == "kl" else None, validation=held,
                    eval_every=args.eval_every, progress=False, report=report)
            name = f"{objective} lr={lr:g}"
            record = report.to_dict()
            record.pop("targets")
            record["perplexity"] = evaluate_all(model, tokenizer, streams)
            # The hold-out's next-token perplexity too, comparable across objectives.
            record["hold_out_perplexity"] = round(perplexity(model, torch.cat(held).flatten(), seq_len=128)["perplexity"], 3)
            result["recovery"][name] = record
            print(name, record["perplexity"], "hold-out", record["hold_out_perplexity"], "validation",
                  record["validation"], f"{record['seconds']:.0f} s", flush=True)
            del model
    result["hold_out_perplexity"] = {
        "dense": round(perplexity(dense, torch.cat(held).flatten(), seq_len=128)["perplexity"], 3),
        "pruned": round(perplexity(pruned, torch.cat(held).flatten(), seq_len=128)["perplexity"], 3)}
    return result


def cmd_holdout(args) -> dict:
    """Recovery settings compared on the calibration hold-out alone (the objective and the next-token
    perplexity on its windows): how the defaults of `recover` were chosen. No test text is read."""
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_smollm2()
    texts = wiki_texts("calibration")
    calibration = token_batches(tokenizer, texts, seq_len=128, num_samples=32, batch_size=4)
    pruned = copy.deepcopy(dense)
    pruner = Pruner(pruned, ratio=args.ratio, progress=False)
    pruner.apply(pruner.plan(calibration))
    train, held = split_calibration(tokenizer, 128, args.samples, args.hold_out)
    flat = torch.cat(held).flatten()
    result: dict = {"settings": vars(args) | {"func": None},
                    "hold_out_perplexity": {"dense": perplexity(dense, flat, seq_len=128)["perplexity"],
                                            "pruned": perplexity(pruned, flat, seq_len=128)["perplexity"]},
                    "runs": []}
    dev = dev_sets(tokenizer) if args.dev else None
    if dev:
        result["dev"] = {"dense": dev_scores(dense, tokenizer, *dev), "pruned": dev_scores(pruned, tokenizer, *dev)}
        print(result["dev"], flush=True)
    print(result["hold_out_perplexity"], flush=True)
    for setting in args.settings:
        steps, batch_size, lr, *more = (float(x) for x in setting.split(","))
        generated = int(more[0]) if more else 0
        text = calibration if args.on_calibration else [torch.cat(train)[: args.samples - generated]]
        model = copy.deepcopy(pruned)
        report = RecoveryReport()
        recover(model, text, steps=int(steps), batch_size=int(batch_size), lr=lr, objective="kl", teacher=dense,
                generated=generated, validation=held, eval_every=50, progress=False, report=report)
        run = {"steps": int(steps), "batch_size": int(batch_size), "lr": lr, "generated": generated,
               "seconds": round(report.seconds), "validation_kl": report.validation,
               "hold_out_perplexity": perplexity(model, flat, seq_len=128)["perplexity"]}
        if dev:
            run["dev"] = dev_scores(model, tokenizer, *dev)
        result["runs"].append(run)
        print(run, flush=True)
    return result


def dev_sets(tokenizer):
    """The docstrings (a domain-shift dev text) and the Social IQa items no suite result reads."""
    from holdout_selection import docstring_stream

    from adaprune.tools.suite import default_data_dir, load_task_examples

    social = load_task_examples(default_data_dir() / "social_iqa" / "task.json", prompt="plain")[1354:1954]
    return docstring_stream(tokenizer), social


def dev_scores(model, tokenizer, docstrings, social) -> dict:
    from adaprune.tools.evaluate import multiple_choice

    choice = multiple_choice(model, tokenizer, social)
    return {"docstrings_perplexity": perplexity(model, docstrings, seq_len=128)["perplexity"],
            "social_iqa_dev": choice["accuracy_norm"], "social_iqa_dev_stderr": choice["accuracy_norm_stderr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    timing = sub.add_parser("timing")
    timing.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    timing.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    timing.add_argument("--steps", type=int, default=4)
    timing.set_defaults(func=cmd_timing)
    quality = sub.add_parser("quality")
    quality.add_argument("--steps", type=int, default=200)
    quality.add_argument("--rank", type=int, default=8)
    quality.add_argument("--lrs", type=float, nargs="+", default=[5e-4])
    quality.add_argument("--objectives", nargs="+", default=["lm", "kl"])
    quality.add_argument("--batch-size", type=int, default=4)
    quality.add_argument("--samples", type=int, default=800, help="training windows of 128 calibration tokens")
    quality.add_argument("--hold-out", type=int, default=32, help="hold-out windows from the calibration split")
    quality.add_argument("--eval-every", type=int, default=50)
    quality.add_argument("--windows", type=int, default=96, help="test windows of 128 per text")
    quality.add_argument("--threads", type=int, default=1)
    quality.set_defaults(func=cmd_quality)
    holdout = sub.add_parser("holdout")
    holdout.add_argument("--ratio", type=float, default=0.2)
    holdout.add_argument("--settings", nargs="+", default=["100,1,5e-4", "100,1,2e-3", "100,4,1e-3"],
                         help="steps,batch_size,lr[,generated] of each recovery (generated: windows sampled "
                              "from the dense model, in place of as many of the --samples text windows)")
    holdout.add_argument("--samples", type=int, default=800, help="training windows of 128 calibration tokens")
    holdout.add_argument("--on-calibration", action="store_true",
                         help="train on the 32 calibration windows instead (the quality benchmark's first protocol)")
    holdout.add_argument("--hold-out", type=int, default=32, help="hold-out windows from the calibration split")
    holdout.add_argument("--dev", action="store_true", help="also the docstrings and Social IQa dev items")
    holdout.add_argument("--threads", type=int, default=1)
    holdout.set_defaults(func=cmd_holdout)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = args.func(args)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
