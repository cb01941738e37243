"""Sixth-session study of the 50 % damage: can the choice of units, the refit's target, the calibration text or
training each layer after the refit take the default prune closer to dense? Hold-out of the CALIBRATION split
and dev sets only, never test text.

    python benchmarks/refit_study.py --ratio 0.5
    python benchmarks/refit_study.py --ratio 0.2
    python benchmarks/refit_study.py --ratio 0.5 --configs "layer-wise training" --train 8,3e-4
    python benchmarks/refit_study.py --ratio 0.5 --configs "trained refit" --train 8,1e-3 --threads 2

Same set-up as benchmarks/holdout_selection.py (SmolLM2-135M; the plan from the first 32 windows of 128
tokens of the Wikipedia calibration stream, the refit from its first 128; hold-out = windows 300-363; the
docstrings of Python's standard library as a domain-shift dev text; Social IQa items 1354-1953, which no
suite result reads, length-normalised accuracy). One default plan per ratio; then:

* ``default``: that plan, refitted as the library does (anchored ridge, damping 0.3, 128 rows).
* ``refit-aware channels``: the same number of MLP channels per layer, but WHICH channels chosen by
  greedy structured OBS on the layer's down-projection input Gram (dense model, 128 rows, damping 0.01):
  the channel whose removal the refit of the others compensates best goes first, 8 at a time, the
  weights and inverse Gram updated after each step. Then refitted as the default.
* ``dense target``: the default plan refitted towards the dense model's own layer outputs
  (``reconstruct={"target": "dense"}``), which also corrects the error carried from upstream.
* ``self-calibration``: plan and refit from half Wikipedia, half text sampled from the dense model
  (``adaprune.stages.recover.teacher_samples``: 64 windows); ``self-calibrated refit``: the default plan,
  refitted from that mix.
* ``layer-wise training``: the default (refitted) model, then each sliced decoder layer in turn trained by
  Adam (lr 1e-4, 4 epochs over the 128 refit rows, 4 rows a step) to give the dense layer's output on the
  pruned model's own inputs (mean squared error), the inputs carried through the layers trained before:
  a local repair that trains, between the closed-form refit and the recovery.
* ``trained refit``: the library's version of it (``reconstruct={"epochs": E, "lr": L}``, from ``--train E,L``):
  each layer trained right after its own refit, its kept entries only, on the masked model (the same plan
  sliced or masked), the inputs carried through the layers refitted and trained before.

Writes benchmarks/results/refit_study.json (entries of other ratios are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from adaprune import Pruner
from adaprune.plugins import detect_spec
from adaprune.stages.recover import teacher_samples
from adaprune.tools.data import _token_stream, load_smollm2, wiki_texts
from adaprune.tools.evaluate import multiple_choice, perplexity
from adaprune.tools.suite import default_data_dir, load_task_examples
from adaprune.units.layerwise import forward_layer, layer_inputs
from adaprune.units.table import UnitTable
from adaprune.vocabulary import Level
from holdout_selection import docstring_stream

CONFIGS = ("default", "refit-aware channels", "dense target", "self-calibration", "self-calibrated refit",
           "layer-wise training", "trained refit")
TRAIN = "4,1e-4"  # the layer-wise training's epochs and learning rate unless --train says otherwise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/refit_study.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", default=TRAIN, help="layer-wise training: epochs,lr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_smollm2()
    stream = torch.tensor(_token_stream(tokenizer, wiki_texts("calibration"), max_tokens=128 * 400))
    wiki = list(stream[: 128 * 128].view(128, 128).split(4))
    plan_rows, refit_rows = wiki[:8], wiki[:32]
    holdout = stream[300 * 128: 364 * 128]
    docstrings = docstring_stream(tokenizer)
    social = load_task_examples(default_data_dir() / "social_iqa" / "task.json", prompt="plain")[1354:1954]

    def measure(model) -> dict:
        choice = multiple_choice(model, tokenizer, social)
        return {"holdout": perplexity(model, holdout, seq_len=128)["perplexity"],
                "python docstrings": perplexity(model, docstrings, seq_len=128)["perplexity"],
                "social_iqa_dev": choice["accuracy_norm"]}

    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["command"] = "python benchmarks/refit_study.py --ratio R (R = 0.5, 0.2)"
    if "dense" not in results:
        results["dense"] = measure(dense)
    plan = Pruner(copy.deepcopy(dense), ratio=args.ratio, progress=False).plan(plan_rows)
    sampled = None
    for label in args.configs.split(","):
        start = time.perf_counter()
        pruned = copy.deepcopy(dense)
        # The refit alone (as this study began, before the library trained layers), unless the config says otherwise.
        reconstruct = {"target": "dense", "epochs": 0} if label == "dense target" else {"epochs": 0}
        if label == "trained refit":  # the library's layer-wise training (reconstruct epochs, lr)
            epochs, lr = args.train.split(",")
            reconstruct = {"epochs": int(epochs), "lr": float(lr)}
            label += f" ({epochs} epochs, lr {lr})"
        pruner = Pruner(pruned, ratio=args.ratio, progress=False, reconstruct=reconstruct)
        this_plan, rows = plan, refit_rows
        if label.startswith("self-calibrat"):
            if sampled is None:
                sampled = teacher_samples(dense, 64, 128, batch_size=4, seed=0)
            rows = mix(wiki[:16], sampled[:16])
            if label == "self-calibration":
                this_plan = pruner.plan(mix(wiki[:4], sampled[:4]))
        if label == "refit-aware channels":
            this_plan = refit_aware_channels(dense, plan, refit_rows)
        pruner.apply(this_plan, calibration=rows)
        if label == "layer-wise training":
            epochs, lr = args.train.split(",")
            train_layerwise(dense, pruned, refit_rows, int(epochs), float(lr))
            label += "" if args.train == TRAIN else f" ({epochs} epochs, lr {lr})"
        entry = {**measure(pruned), "seconds": round(time.perf_counter() - start, 1),
                 "parameters": this_plan.params["total_after"]}
        results[f"{args.ratio:g} {label}"] = entry
        print(f"{args.ratio:g} {label}: {entry}", flush=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def train_layerwise(dense, pruned, rows: list[torch.Tensor], epochs: int = 4, lr: float = 1e-4) -> None:
    """Train each sliced decoder layer of `pruned` to give the dense layer's output on its own inputs."""
    spec = detect_spec(dense)
    dense_layers, pruned_layers = spec.decoder_layers(dense), spec.decoder_layers(pruned)
    with torch.no_grad():
        hidden, arguments = layer_inputs(pruned, pruned_layers[0], rows)
    generator = torch.Generator().manual_seed(0)
    for dense_layer, layer in zip(dense_layers, pruned_layers):
        with torch.no_grad():
            targets = [forward_layer(dense_layer, h, a) for h, a in zip(hidden, arguments)]
        weights = [p for p in layer.parameters() if p.dim() == 2]
        for p in layer.parameters():
            p.requires_grad_(p.dim() == 2)
        optimizer = torch.optim.Adam(weights, lr=lr)
        for _ in range(epochs):
            for b in torch.randperm(len(hidden), generator=generator).tolist():
                loss = (forward_layer(layer, hidden[b], arguments[b]) - targets[b]).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            hidden = [forward_layer(layer, h, a) for h, a in zip(hidden, arguments)]


def mix(first: list[torch.Tensor], second: list[torch.Tensor]) -> list[torch.Tensor]:
    return [batch for pair in zip(first, second) for batch in pair]


def refit_aware_channels(dense, plan, rows: list[torch.Tensor], damping: float = 0.01, step: int = 8):
    """The plan with each layer's removed channels re-chosen by greedy structured OBS (same counts)."""
    table = UnitTable(dense, detect_spec(dense))
    inputs = {}  # layer index -> (module path of the projection reading the channels, column owners)
    for layer in table:
        members = layer.input_members(Level.CHANNEL)
        if len(members) == 1:  # one projection reads the channels (no fused layout in this study)
            inputs[layer.index] = (members[0].module_path, members[0].owner)
    grams = {path: 0 for path, _ in inputs.values()}

    def hook(path):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[path] = grams[path] + x.T @ x
        return accumulate

    handles = [dense.get_submodule(path).register_forward_pre_hook(hook(path)) for path in grams]
    with torch.no_grad():
        for ids in rows:
            dense(input_ids=ids)
    for handle in handles:
        handle.remove()
    new = copy.deepcopy(plan)
    for layer_plan in new.layers:
        if layer_plan.index not in inputs or layer_plan.remove_mlp or not layer_plan.remove_channels:
            continue
        path, owner = inputs[layer_plan.index]
        assert torch.equal(owner, torch.arange(len(owner))), "one column per channel, in order"
        weight = dense.get_submodule(path).weight.detach()
        layer_plan.remove_channels = greedy_obs(weight, grams[path], len(layer_plan.remove_channels), damping, step)
    return new


def greedy_obs(weight: torch.Tensor, gram: torch.Tensor, remove: int, damping: float, step: int) -> list[int]:
    """Columns of `weight` to remove, `step` at a time: each time those whose removal (with the rest refitted)
    costs least output error, ||w_c||^2 / [H^-1]_cc, then the OBS update of the weights and of H^-1."""
    width = weight.shape[1]
    hessian = gram + damping * gram.diagonal().mean() * torch.eye(width, dtype=gram.dtype)
    inverse = torch.linalg.inv(hessian)
    weight = weight.double().clone()
    alive = torch.ones(width, dtype=torch.bool)
    removed: list[int] = []
    while len(removed) < remove:
        costs = weight.pow(2).sum(0) / inverse.diagonal()
        costs[~alive] = float("inf")
        take = torch.argsort(costs)[: min(step, remove - len(removed))]
        block = torch.linalg.inv(inverse[take][:, take])
        weight -= weight[:, take] @ block @ inverse[take, :]
        inverse -= inverse[:, take] @ block @ inverse[take, :]
        weight[:, take] = 0
        alive[take] = False
        removed += take.tolist()
    return sorted(removed)


if __name__ == "__main__":
    raise SystemExit(main())
