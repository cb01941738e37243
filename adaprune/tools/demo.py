"""`adaprune demo`: prune the embedded SmolLM2-135M and show what it gained and lost."""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .data import load_smollm2, test_token_stream, token_batches, wiki_texts
from .evaluate import perplexity, prefill_tokens_per_second, tokens_per_second
from ..errors import ConfigurationError
from ..io import atomic_directory, check_output_folder
from ..pipeline import Pruner
from ..plan import PLAN_FILE

CALIBRATION_SAMPLES = 32  # the plan's rows
RECONSTRUCTION_SAMPLES = 128  # the refit's (the same stream, further on): both chosen on the calibration hold-out
SEQ_LEN = 128
EVAL_WINDOWS = 96

# Run in a separate interpreter with adaprune made unimportable: the checkpoint must stand alone.
RELOAD_CHECK = """
import sys, torch
sys.modules["adaprune"] = None
from transformers import AutoModelForCausalLM
folder, ids = sys.argv[1], torch.load(sys.argv[2])
remote = "auto_map" in open(folder + "/config.json").read()
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
print(type(model).__name__, "remote code" if remote else "stock classes")
"""


SPEED_ROUNDS = 5
SPEEDS = {  # key -> (label, measurement)
    "generate_tokens_per_second": ("generate tok/s (batch 1)",
                                   lambda m: tokens_per_second(m, prompt_len=64, new_tokens=32, repeats=1)),
    "prefill_tokens_per_second": ("prefill tok/s (4 x 128)", lambda m: prefill_tokens_per_second(m, repeats=1)),
}


def quality(model, stream: torch.Tensor) -> dict[str, float]:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": perplexity(model, stream, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)["perplexity"],
    }


def speeds(dense, pruned) -> tuple[dict[str, float], dict[str, float]]:
    """Median speeds of both models, measured in alternation so that a noisy machine slows both alike."""
    samples = {name: {key: [] for key in SPEEDS} for name in ("dense", "pruned")}
    for _ in range(SPEED_ROUNDS):
        for name, model in (("dense", dense), ("pruned", pruned)):
            for key, (_, measure) in SPEEDS.items():
                samples[name][key].append(measure(model))
    return tuple({key: statistics.median(values) for key, values in samples[name].items()}
                 for name in ("dense", "pruned"))


class _ReloadFailed(Exception):
    """The saved checkpoint did not reload in a fresh interpreter (its stderr is the message)."""


def check_demo_output(out: str | Path, overwrite: bool = False) -> Path:
    """The demo replaces its own earlier output; any other non-empty folder only with `overwrite`."""
    folder = Path(out)
    earlier = (folder / PLAN_FILE).is_file()
    return check_output_folder(folder, "--out", overwrite=overwrite or earlier)


def run_demo(out: str = "out/smollm2-pruned", ratio: float = 0.2, overwrite: bool = False) -> int:
    """Prune SmolLM2-135M, compare it with the dense model, save it to `out` and reload it without adaprune."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:  # before the model loads
        raise ConfigurationError(f"ratio must be in [0, 1), got {ratio!r}: it is the fraction of prunable "
                                 "parameters to remove (0.2 removes a fifth).")
    folder = check_demo_output(out, overwrite)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f} s")
    stream = test_token_stream(tokenizer)
    before = quality(model, stream)
    dense = copy.deepcopy(model)  # kept for the side-by-side speed measurement
    refit_rows = token_batches(tokenizer, wiki_texts("calibration"), seq_len=SEQ_LEN,
                               num_samples=max(RECONSTRUCTION_SAMPLES, CALIBRATION_SAMPLES), batch_size=4)
    batches = list(torch.cat(refit_rows)[:CALIBRATION_SAMPLES].split(4))  # the plan's: the first rows
    pruner = Pruner(model, ratio=ratio)  # the defaults: the best configuration of the quality benchmark
    plan = pruner.plan(batches)
    pruner.apply(plan, calibration=refit_rows)
    after = quality(model, stream)
    dense_speed, pruned_speed = speeds(dense, model)
    before.update(dense_speed)
    after.update(pruned_speed)
    del dense

    ids = stream[: SEQ_LEN].unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # Saved into a temporary sibling and checked there: the folder appears only once it reloads.
    try:
        with atomic_directory(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            plan.save(tmp / PLAN_FILE)
            torch.save(ids, tmp / "check_ids.pt")
            checked = subprocess.run([sys.executable, "-c", RELOAD_CHECK, str(tmp), str(tmp / "check_ids.pt"),
                                      str(tmp / "check_logits.pt")], capture_output=True, text=True)
            if checked.returncode != 0:
                raise _ReloadFailed(checked.stderr)
            reload_error = (torch.load(tmp / "check_logits.pt") - expected).abs().max().item()
    except _ReloadFailed as failure:
        print(f"{failure}\nadaprune: the pruned checkpoint did not reload without adaprune; {folder} was not "
              "written.", file=sys.stderr)
        return 1

    print()
    print(f"{'':26}{'before':>14}{'after':>14}{'after/before':>14}")
    rows = [("params", "parameters", "{:,.0f}"), ("perplexity", "perplexity (wiki test)", "{:.2f}")]
    rows += [(key, label, "{:.1f}") for key, (label, _) in SPEEDS.items()]
    for key, label, fmt in rows:
        print(f"{label:26}{fmt.format(before[key]):>14}{fmt.format(after[key]):>14}"
              f"{after[key] / before[key]:>14.3f}")
    print(f"(speeds: medians of {SPEED_ROUNDS} rounds, dense and pruned measured in alternation)")
    print()
    print(f"removed {1 - after['params'] / before['params']:.1%} of all parameters "
          f"({plan.params['removed'] / plan.params['prunable_before']:.1%} of the prunable ones); "
          f"stages (s): {json.dumps(pruner.timings)}")
    print("kept per layer (heads/kv groups/channels): "
          + " ".join(f"{s['heads']}/{s['kv_groups']}/{s['channels']}" for s in plan.summary()["layers"]))
    print(f"saved to {folder}; reloaded without adaprune as {checked.stdout.strip()}; "
          f"max logit difference {reload_error:.2e}")
    return 0 if reload_error < 1e-3 else 1
