"""Eighth-session study of the zero-shot gap at 20 %: is it the cut (the plan, its calibration text) or the
repair after it (refit, layer-wise training, recovery) that moves the pruned model's multiple-choice behaviour
away from the dense model's? Dev sets only, never the suite's items.

    python benchmarks/zero_shot_study.py --threads 2
    python benchmarks/zero_shot_study.py --configs "no reconstruction,self-calibration" --threads 2

SmolLM2-135M, the quality benchmark's default at 20 % (plan from 32 calibration windows of 128 tokens, the
refit from 128, recovery on 800 calibration windows, 4 rows a step, KL to the dense model, lr 1e-3). Dev
measures: Social IQa items 1354-1953 (no suite result reads them; length-normalised accuracy, as the suite
scores it); the first 100 items of five BIG-bench tasks the suite does not hold (the dense model is near
chance on them, so accuracy says nothing, but how often the pruned model picks what the dense one picks, and
the KL between their choice distributions, says how much of its zero-shot behaviour survived, with far less
noise than an accuracy); the docstrings of Python's standard library (a domain-shift text); and a hold-out of
the calibration split (windows past the recovery's 800).

Configurations: ``recovery 100`` (what the quality benchmark ran); ``trained + recovery 100`` (the layer-wise
training, 8 epochs at lr 1e-3, then the recovery); ``recovery 200`` and the like (any step count);
``trained + recovery 200 generated 400`` (the recovery's text joined by 400 windows sampled from the dense
model, ``recover(generated=400)``; eleventh session; without ``generated`` none is). Each line
is also measured before its recovery (``default``, ``trained``, ``self-calibration``, ...). Without a recovery: ``no reconstruction``
(the same plan, no refit) and ``self-calibration`` (plan and refit from half Wikipedia, half text sampled
from the dense model, ``adaprune.stages.recover.teacher_samples``), ``self-calibrated plan`` (that plan, the
refit from Wikipedia alone): where is the damage, the cut or the refit? Ninth session, other plans, the refit
on Wikipedia: ``sampled plan 2/8`` (a quarter of the plan's batches sampled), ``cap 0.4`` (global allocation
with ``max_layer_fraction``), ``channels only`` (no KV group removed), ``uniform`` (the same share from every
layer), ``second draw`` (the default plan from calibration rows 32-63, the plan's own noise), ``both draws``
(from rows 0-63 pooled). Twelfth session: ``iterative 2`` (the trained default in two cuts of 10 %, the second
planned on what the first left). Scoring stays
the study's own ``choice_logprobs``, so that its rows compare with the eighth session's; the library's
``multiple_choice(..., reference=dense)`` now measures the same agreement for users.

Writes benchmarks/results/zero_shot_study.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from adaprune import Pruner, recover
from adaprune.stages.recover import teacher_samples
from adaprune.tools.data import _token_stream, load_smollm2, token_batches, wiki_texts
from adaprune.tools.evaluate import multiple_choice, perplexity
from adaprune.tools.suite import default_data_dir, load_task_examples
from holdout_selection import docstring_stream
from refit_study import mix

BASES = ("default", "trained", "no reconstruction", "self-calibration", "self-calibrated plan", "channels only",
         "uniform", "second draw", "both draws")  # measured without a recovery
CONFIGS = ("recovery 100", "trained + recovery 100", "no reconstruction", "self-calibration")
PROXY_TASKS = ("strategyqa", "sports_understanding", "winowhy", "implicatures", "general_knowledge")


def choice_logprobs(model, tokenizer, examples: list[dict]) -> list[torch.Tensor]:
    """Per item, the log-softmax over its choices of the length-normalised log-likelihoods (the suite's score)."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for example in examples:
            question = example["input"].rstrip()
            # The question's own tokens; where " " + choice merges with its last token, dense and pruned see the
            # same boundary, which is all a comparison between them needs.
            start = len(tokenizer(question, add_special_tokens=False)["input_ids"])
            encoded = [tokenizer(question + " " + c, add_special_tokens=False)["input_ids"] for c in example["choices"]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), pad)
            mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(encoded):
                input_ids[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
            keep = width - start + 1  # only the positions that predict the choices' tokens
            logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, input_ids[:, start:, None])[..., 0]
            scores = [logprobs[row, :len(ids) - start].sum().item() / len(" " + c)
                      for row, (ids, c) in enumerate(zip(encoded, example["choices"]))]
            out.append(torch.log_softmax(torch.tensor(scores), 0))
    return out


def iterative_prune(dense, ratio: float, cuts: int, plan_rows, refit_rows) -> tuple[torch.nn.Module, int]:
    """The trained default reached in `cuts` equal steps, each planned on the model the last one left, its
    layer-wise training aimed at that model (twelfth session). The seconds count the planning too."""
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    removed = 0.0  # share of the dense model's prunable parameters
    for cut in range(1, cuts + 1):
        target = ratio * cut / cuts
        pruner = Pruner(model, ratio=(target - removed) / (1 - removed), progress=False,
                        reconstruct={"epochs": 8, "lr": 1e-3})
        plan = pruner.plan(plan_rows)
        pruner.apply(plan, calibration=refit_rows)
        removed += (1 - removed) * plan.params["prunable_fraction_removed"]
    return model, round(time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/zero_shot_study.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_smollm2()
    texts = wiki_texts("calibration")
    plan_rows = token_batches(tokenizer, texts, seq_len=128, num_samples=32, batch_size=4)
    refit_rows = token_batches(tokenizer, texts, seq_len=128, num_samples=128, batch_size=4)
    recovery_text = token_batches(tokenizer, texts, seq_len=128, num_samples=800, batch_size=800)
    stream = torch.tensor(_token_stream(tokenizer, texts, max_tokens=128 * 1064))
    holdout = stream[1000 * 128:]
    docstrings = docstring_stream(tokenizer)
    data = default_data_dir()
    social = load_task_examples(data / "social_iqa" / "task.json", prompt="plain")[1354:1954]
    proxy = [e for task in PROXY_TASKS
             for e in load_task_examples(data / "bigbench" / task / "task.json", prompt="plain", limit=100)]
    reference = choice_logprobs(dense, tokenizer, proxy)

    def measure(model) -> dict:
        started = time.perf_counter()
        mine = choice_logprobs(model, tokenizer, proxy)
        kl = sum(torch.sum(r.exp() * (r - m)).item() for r, m in zip(reference, mine)) / len(mine)
        agree = sum(int(r.argmax() == m.argmax()) for r, m in zip(reference, mine)) / len(mine)
        social_iqa = multiple_choice(model, tokenizer, social)
        return {"holdout_ppl": round(perplexity(model, holdout, seq_len=128)["perplexity"], 2),
                "docstrings_ppl": round(perplexity(model, docstrings, seq_len=128)["perplexity"], 2),
                "social_iqa_dev": round(100 * social_iqa["accuracy_norm"], 1),
                "proxy_agreement": round(100 * agree, 1), "proxy_choice_kl": round(kl, 4),
                "measure_seconds": round(time.perf_counter() - started)}

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    key = f"{args.ratio:g}"
    results.setdefault(key, {})
    if "dense" not in results[key]:
        results[key]["dense"] = measure(dense)
        print("dense", results[key]["dense"], flush=True)

    def save(label: str, row: dict) -> None:
        results[key][label] = row
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(label, row, flush=True)

    plans = {}  # the default plan from plan_rows is made only when a configuration uses it
    pruned: dict[str, torch.nn.Module] = {}
    for label in args.configs.split(","):
        base, _, steps = label.partition(" + recovery ") if " + " in label else ("default", "", label.split()[-1])
        if label in BASES or (label.startswith(("cap ", "sampled plan ", "iterative ")) and " + " not in label):
            base, steps = label, ""
        if base not in pruned:
            plan_from, refit_from = plan_rows, refit_rows
            if base in ("self-calibration", "self-calibrated plan"):  # half the rows sampled from the dense model
                sampled = teacher_samples(dense, 64, 128, batch_size=4, seed=0)
                plan_from = mix(plan_rows[:4], sampled[:4])
                refit_from = mix(refit_rows[:16], sampled) if base == "self-calibration" else refit_rows
                plans[base] = Pruner(dense, ratio=args.ratio, progress=False).plan(plan_from)
            elif base.startswith("sampled plan "):  # "sampled plan 2/8": that share of the plan's batches sampled
                share = int(base.split()[-1].split("/")[0])
                sampled = teacher_samples(dense, 4 * share, 128, batch_size=4, seed=0)
                plans[base] = Pruner(dense, ratio=args.ratio, progress=False).plan(plan_rows[:8 - share] + sampled)
            elif base in ("channels only", "uniform"):  # no KV group removed; the same share from every layer
                options = {"units": ("channels",)} if base == "channels only" else {"allocation": "uniform"}
                plans[base] = Pruner(dense, ratio=args.ratio, progress=False, **options).plan(plan_rows)
            elif base in ("second draw", "both draws"):  # the next 32 rows (the plan's own noise); 64 rows, pooled
                rows = refit_rows[8:16] if base == "second draw" else refit_rows[:16]
                plans[base] = Pruner(dense, ratio=args.ratio, progress=False).plan(rows)
            elif base.startswith("cap "):  # "cap 0.4": no layer loses more than that share of its prunable parameters
                plans[base] = Pruner(dense, ratio=args.ratio, progress=False, allocation_options={
                    "max_layer_fraction": float(base.split()[-1])}).plan(plan_rows)
            if base.startswith("iterative "):  # "iterative 2": the trained default in that many equal cuts, re-planned
                model, seconds = iterative_prune(dense, args.ratio, int(base.split()[-1]), plan_rows, refit_rows)
            else:
                reconstruct = (False if base == "no reconstruction"
                               else {"epochs": 8 if base == "trained" else 0, "lr": 1e-3})
                if base not in plans and "wikipedia" not in plans:
                    plans["wikipedia"] = Pruner(dense, ratio=args.ratio, progress=False).plan(plan_rows)
                model = copy.deepcopy(dense)
                started = time.perf_counter()  # the apply and its refit, as before: planning is not counted
                Pruner(model, ratio=args.ratio, progress=False, reconstruct=reconstruct).apply(
                    plans[base] if base in plans else plans["wikipedia"], calibration=refit_from)
                seconds = round(time.perf_counter() - started)
            pruned[base] = model
            if base not in results[key]:  # a stored row is not measured again (re-measured rows reproduced)
                save(base, {**measure(model), "prune_seconds": seconds})
        if not steps:
            continue
        steps, _, generated = steps.partition(" generated ")  # "200 generated 400": 400 windows sampled from dense
        model = copy.deepcopy(pruned[base])
        started = time.perf_counter()
        recover(model, recovery_text, steps=int(steps), batch_size=4, lr=1e-3, objective="kl", teacher=dense,
                generated=int(generated or 0), progress=False)
        save(label, {**measure(model), "recovery_seconds": round(time.perf_counter() - started)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
