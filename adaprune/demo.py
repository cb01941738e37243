"""`adaprune demo`: prune the embedded SmolLM2-135M and show what it gained and lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .data import load_smollm2, test_token_stream, token_batches, wiki_texts
from .evaluate import perplexity, tokens_per_second
from .pruner import Pruner

CALIBRATION_SAMPLES = 32
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


def measure(model, stream: torch.Tensor) -> dict[str, float]:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": perplexity(model, stream, seq_len=SEQ_LEN, max_windows=EVAL_WINDOWS)["perplexity"],
        "tokens_per_second": tokens_per_second(model, prompt_len=64, new_tokens=32, repeats=3),
    }


def run_demo(out: str = "out/smollm2-pruned", ratio: float = 0.2) -> int:
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f} s")
    stream = test_token_stream(tokenizer)
    before = measure(model, stream)
    batches = token_batches(tokenizer, wiki_texts("calibration"), seq_len=SEQ_LEN,
                            num_samples=CALIBRATION_SAMPLES, batch_size=4)
    pruner = Pruner(model, ratio=ratio, estimators=["taylor"])
    plan = pruner.plan(batches)
    pruner.apply(plan)
    after = measure(model, stream)

    folder = Path(out)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plan.save(folder / "adaprune_plan.json")
    ids = stream[: SEQ_LEN].unsqueeze(0)
    torch.save(ids, folder / "check_ids.pt")
    checked = subprocess.run([sys.executable, "-c", RELOAD_CHECK, str(folder), str(folder / "check_ids.pt"),
                              str(folder / "check_logits.pt")], capture_output=True, text=True)
    if checked.returncode != 0:
        print(checked.stderr, file=sys.stderr)
        return 1
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reload_error = (torch.load(folder / "check_logits.pt") - expected).abs().max().item()

    print()
    print(f"{'':22}{'before':>14}{'after':>14}{'after/before':>14}")
    for key, label, fmt in (("params", "parameters", "{:,.0f}"), ("perplexity", "perplexity (wiki test)", "{:.2f}"),
                            ("tokens_per_second", "tokens / second", "{:.1f}")):
        print(f"{label:22}{fmt.format(before[key]):>14}{fmt.format(after[key]):>14}"
              f"{after[key] / before[key]:>14.3f}")
    print()
    print(f"removed {1 - after['params'] / before['params']:.1%} of all parameters "
          f"({plan.params['removed'] / plan.params['prunable_before']:.1%} of the prunable ones); "
          f"stages (s): {json.dumps(pruner.report['stages'])}")
    print(f"kept per layer (heads/kv groups/channels): "
          + " ".join(f"{s['heads']}/{s['kv_groups']}/{s['channels']}" for s in plan.summary()["layers"]))
    print(f"saved to {folder}; reloaded without adaprune as {checked.stdout.strip()}; "
          f"max logit difference {reload_error:.2e}")
    return 0 if reload_error < 1e-3 else 1
