"""How adaprune's defaults were chosen: perplexity on a hold-out of the CALIBRATION split, never on test text.

    python benchmarks/holdout_selection.py reconstruction --ratios 0.2,0.5
    python benchmarks/holdout_selection.py defaults --ratios 0.2,0.5
    python benchmarks/holdout_selection.py anchor --ratios 0.2,0.5
    python benchmarks/holdout_selection.py iterative --ratios 0.5 --steps 2
    python benchmarks/holdout_selection.py allocation --ratios 0.5
    python benchmarks/holdout_selection.py allocation --ratios 0.2 --configs "default,query heads + cap 0.6,query heads,cap 0.6 per layer"

SmolLM2-135M; calibration = the first 32 windows of 128 tokens of the Wikipedia calibration stream,
hold-out = windows 300-363 of the same stream (disjoint tokens). One calibration pass serves every
configuration (a score cache); each prunes a fresh copy of the dense model. 1 thread.
Every result file of these studies was made with the closed-form refit alone: since the seventh session
the default reconstruction also trains each layer when a third or more of the prunable parameters go
(``epochs="auto"``), so the 50 % rows now reproduce with ``reconstruct={"epochs": 0, ...}``.

* ``reconstruction``: Taylor, fixed 50/50 fusion, uniform allocation; no reconstruction against
  the reconstruction targets and dampings.
* ``defaults``: the adaptive fusion with reconstruction; Taylor alone or with the activation (and
  fluctuation) score as further candidates; uniform or global allocation.
* ``anchor``: the default plan (made once per ratio), reconstructed in several ways: none, the
  plain ridge (towards zero), the ridge towards the dense weights at several dampings, and the plain
  ridge from four times the calibration rows (and the plan itself made from them: "planned on x4
  rows"). Measured on the calibration hold-out and on a
  domain-shift DEV text that is none of the test texts: docstrings of Python's standard library
  (technical prose about code), since the test texts showed that a refit which helps in domain can
  hurt out of it.
* ``iterative``: the default prune reached in ``--steps`` steps, each a full default prune (score,
  adaptive blend, global allocation, reconstruction from 128 rows) of the previous step's sliced
  model, removing an equal share of the dense model's prunable parameters; each step is measured
  on the hold-out and the docstrings.
* ``allocation``: where the damage of the default prune at 50 % is, and fixes to the plan.
  First the default plan itself: the fraction of each layer's attention and MLP it keeps, and each
  layer's output error after the cut (reconstruction included) on hold-out windows, both with the
  dense layer's own input (what the layer itself lost, relative to the dense layer's update of the
  residual stream) and along the pruned model (the error as it accumulates). Then variants of the
  default, each a full prune (the adaptive fusion trained with the variant's allocation in its loop,
  reconstruction from 128 rows) from one shared score cache: a cap on the fraction of any layer's
  prunable parameters the global list may take (``allocation_options={"max_layer_fraction": ...}``),
  the layer weights sharpened or flattened (a power of the block importance), the attention's costs
  scaled against the MLP's, whole blocks, query heads instead of KV groups, the refit's damping,
  the fusion's steps. Written to benchmarks/results/holdout_allocation.json as it goes (entries of
  earlier runs are kept, so the 20 % check can be added by a second command).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from adaprune import Pruner
from adaprune.allocation.base import AllocationScores
from adaprune.allocation.budget import Budget
from adaprune.allocation.ranked import GlobalAllocator
from adaprune.plan import LayerPlan
from adaprune.plugins import detect_spec
from adaprune.tools.data import _token_stream, load_smollm2, wiki_texts
from adaprune.tools.evaluate import perplexity
from adaprune.units.table import UnitTable
from adaprune.vocabulary import BlockKind, Level

RECONSTRUCTION = {"none": False, "pruned 0.01": {"target": "pruned"}, "pruned 0.1": {"target": "pruned", "damping": 0.1},
                  "pruned 0.01 add_bias": {"target": "pruned", "add_bias": True}, "dense 0.01": {"target": "dense"}}
ANCHOR = {"none": False, "zero 0.01": True, "dense 0.01": {"anchor": "dense"},
          "dense 0.1": {"anchor": "dense", "damping": 0.1}, "dense 1": {"anchor": "dense", "damping": 1.0},
          "zero 0.01 x4 rows": {"samples": 128}, "dense 0.1 x4 rows": {"anchor": "dense", "damping": 0.1, "samples": 128},
          "dense 1 x4 rows": {"anchor": "dense", "damping": 1.0, "samples": 128},
          "dense 0.3 x4 rows": {"anchor": "dense", "damping": 0.3, "samples": 128},
          "dense 1 x8 rows": {"anchor": "dense", "damping": 1.0, "samples": 256},
          "dense 0.3 x4 rows planned on x4 rows": {"anchor": "dense", "damping": 0.3, "samples": 128}}
PLANNED_ON_MORE = " planned on x4 rows"  # the plan too is made from the 128 rows, not the first 32
DEFAULTS = {"taylor uniform": (["taylor"], "uniform"), "taylor global": (["taylor"], "global"),
            "taylor+activation global": (["taylor", "activation"], "global"),
            "taylor+activation+fluctuation global": (["taylor", "activation", "fluctuation"], "global")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("reconstruction", "defaults", "anchor", "iterative", "allocation"))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the study's configurations")
    parser.add_argument("--steps", type=int, default=2, help="iterative: prunes to reach each ratio")
    parser.add_argument("--out", default="benchmarks/results/holdout_allocation.json",
                        help="allocation: the JSON written as the study goes (entries already there are kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    stream = torch.tensor(_token_stream(tokenizer, wiki_texts("calibration"), max_tokens=128 * 400))
    calibration = list(stream[: 32 * 128].view(32, 128).split(4))
    holdout = stream[300 * 128: 364 * 128]
    if args.study == "anchor":
        return anchor_study(model, tokenizer, stream, calibration, holdout, [float(r) for r in args.ratios.split(",")],
                            args.configs.split(",") if args.configs else list(ANCHOR))
    if args.study == "allocation":
        return allocation_study(model, stream, calibration, holdout, [float(r) for r in args.ratios.split(",")],
                                args.configs.split(",") if args.configs else list(ALLOCATION),
                                shift=docstring_stream(tokenizer), out=args.out)
    if args.study == "iterative":
        return iterative_study(model, stream, calibration, holdout, [float(r) for r in args.ratios.split(",")],
                               args.steps, shift=docstring_stream(tokenizer))
    estimators = ["taylor"] if args.study == "reconstruction" else ["taylor", "activation", "fluctuation"]
    scores = Pruner(model, estimators=estimators, progress=False).score(calibration)
    results = {"dense": perplexity(model, holdout, seq_len=128)["perplexity"]}
    print(f"dense {results['dense']:.2f}", flush=True)
    table = RECONSTRUCTION if args.study == "reconstruction" else DEFAULTS
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for label in (args.configs.split(",") if args.configs else table):
            if args.study == "reconstruction":
                settings = {"estimators": ["taylor"], "fusion": "fixed", "allocation": "uniform",
                            "reconstruct": table[label]}
            else:
                names, allocation = table[label]
                settings = {"estimators": names, "allocation": allocation}
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            pruner = Pruner(pruned, ratio=ratio, progress=False, **settings)
            pruner.apply(pruner.plan(calibration, scores=scores))
            results[f"{ratio:g} {label}"] = perplexity(pruned, holdout, seq_len=128)["perplexity"]
            print(f"{ratio:g} {label}: {results[f'{ratio:g} {label}']:.2f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(json.dumps(results, indent=1))
    return 0


def python_docstrings(max_paragraphs: int = 4000) -> list[str]:
    """Paragraphs of the docstrings of Python's standard library: a domain-shift dev text (not a test text)."""
    import ast
    import sysconfig
    from pathlib import Path

    paragraphs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for paragraph in (doc or "").split("\n\n"):
                    text = " ".join(paragraph.split())
                    if len(text) >= 200:
                        paragraphs.append(text)
    return paragraphs[:max_paragraphs]


def docstring_stream(tokenizer) -> torch.Tensor:
    """The domain-shift dev text as one token stream of 64 windows of 128 tokens."""
    return torch.tensor(_token_stream(tokenizer, python_docstrings(), max_tokens=128 * 64))


def anchor_study(model, tokenizer, stream, calibration, holdout, ratios, labels) -> int:
    shift = docstring_stream(tokenizer)
    many = list(stream[: 256 * 128].view(256, 128).split(4))  # the first 32 rows are the calibration's own
    sources = {False: calibration, True: many[:32]}  # what the plan is made from: 32 or 128 rows
    scores: dict[bool, object] = {}
    results = {"dense": {"holdout": perplexity(model, holdout, seq_len=128)["perplexity"],
                         "python docstrings": perplexity(model, shift, seq_len=128)["perplexity"]}}
    print(f"dense {results['dense']}", flush=True)
    for ratio in ratios:
        plans = {}
        for label in labels:
            options = ANCHOR[label]
            more = PLANNED_ON_MORE in label
            if more not in scores:
                scores[more] = Pruner(model, progress=False).score(sources[more])
            if more not in plans:
                plans[more] = Pruner(model, ratio=ratio, reconstruct=False, progress=False).plan(
                    sources[more], scores=scores[more])
            plan = plans[more]
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            rows = many if isinstance(options, dict) and options.get("samples", 64) > 64 else calibration
            Pruner(pruned, ratio=ratio, reconstruct=options, progress=False).apply(plan, calibration=rows)
            results[f"{ratio:g} {label}"] = {
                "holdout": perplexity(pruned, holdout, seq_len=128)["perplexity"],
                "python docstrings": perplexity(pruned, shift, seq_len=128)["perplexity"]}
            print(f"{ratio:g} {label}: {results[f'{ratio:g} {label}']} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(json.dumps(results, indent=1))
    return 0


def iterative_study(dense, stream, calibration, holdout, ratios, steps, shift) -> int:
    rows = list(stream[: 128 * 128].view(128, 128).split(4))  # the reconstruction's 128 rows, as the CLI gives

    def prunable_left(model) -> int:
        return UnitTable(model, detect_spec(model)).prunable_count()

    prunable = prunable_left(dense)
    results = {}
    for ratio in ratios:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            left = prunable_left(model)
            share = (ratio * prunable * step / steps - (prunable - left)) / left  # of what is left
            pruner = Pruner(model, ratio=share, progress=False)
            pruner.apply(pruner.plan(calibration), calibration=rows)
            label = f"{ratio:g} step {step}/{steps}"
            results[label] = {"holdout": perplexity(model, holdout, seq_len=128)["perplexity"],
                              "python docstrings": perplexity(model, shift, seq_len=128)["perplexity"],
                              "removed": 1 - prunable_left(model) / prunable}
            print(f"{label}: {results[label]} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(json.dumps(results, indent=1))
    return 0


class VariantAllocator(GlobalAllocator):
    """The global allocation with the layer weights the ``allocation`` study tries (the library's when both are 1).

    `power`: the layer weights (block importance relative to the mean layer) raised to this power
    (above 1 sharper, below flatter); `attention`: a factor on every attention cost against the
    MLP's (the per-site normalisation leaves no scale between the two). Other options (the cap,
    ``max_layer_fraction``) are the library's own.
    """

    def __init__(self, power: float = 1.0, attention: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.power, self.attention = power, attention

    def allocate(self, units: UnitTable, scores: AllocationScores, budget: Budget) -> list[LayerPlan]:
        blocks = {kind: [v if v is None or not v > 0 else v ** self.power * (self.attention if kind is
                         BlockKind.ATTENTION else 1.0) for v in values] for kind, values in scores.blocks.items()}
        return super().allocate(units, AllocationScores(scores.units, blocks), budget)


# label -> Pruner options over the defaults, and VariantAllocator options (None: the library's global)
CAP = "max_layer_fraction"
ALLOCATION = {
    "default": ({}, None),
    "cap 0.75 per layer": ({"allocation_options": {CAP: 0.75}}, None),
    "cap 0.65 per layer": ({"allocation_options": {CAP: 0.65}}, None),
    "cap 0.6 per layer": ({"allocation_options": {CAP: 0.6}}, None),
    "cap 0.55 per layer": ({"allocation_options": {CAP: 0.55}}, None),
    "cap 0.5 per layer": ({"allocation_options": {CAP: 0.5}}, None),
    "layer weight ^2": ({}, {"power": 2.0}),
    "layer weight ^0.5": ({}, {"power": 0.5}),
    "attention x0.5": ({}, {"attention": 0.5}),
    "attention x2": ({}, {"attention": 2.0}),
    "blocks": ({"units": ("kv_groups", "channels", "blocks")}, None),
    "query heads": ({"units": ("query_heads", "channels")}, None),
    "query heads + cap 0.6": ({"units": ("query_heads", "channels"), "allocation_options": {CAP: 0.6}}, None),
    "damping 0.1": ({"reconstruct": {"damping": 0.1}}, None),
    "fusion 48 steps": ({"fusion_options": {"steps": 48}}, None),
}


def kept_fractions(plan, table: UnitTable) -> dict[str, list[float]]:
    """Per layer: the fraction of its attention, of its MLP and of all its prunable parameters the plan keeps."""
    attention, mlp, layer = [], [], []
    for layer_plan, units in zip(plan.layers, table):
        groups, channels = units.unit_param_counts(Level.KV_GROUP), units.unit_param_counts(Level.CHANNEL)
        heads = units.unit_param_counts(Level.HEAD)
        gone_attention = int(groups.sum()) if layer_plan.remove_attention else \
            int(groups[layer_plan.remove_kv_groups].sum()) + int(heads[layer_plan.remove_heads].sum())
        gone_mlp = int(channels.sum()) if layer_plan.remove_mlp else int(channels[layer_plan.remove_channels].sum())
        attention.append(round(1 - gone_attention / int(groups.sum()), 4))
        mlp.append(round(1 - gone_mlp / int(channels.sum()), 4))
        layer.append(round(1 - (gone_attention + gone_mlp) / units.prunable_size(), 4))
    return {"attention": attention, "mlp": mlp, "layer": layer}


def layer_errors(dense, pruned, windows: torch.Tensor) -> dict[str, list[float]]:
    """Each decoder layer's output error, pruned against dense, on `windows`.

    ``local``: the pruned layer fed the dense layer's input, error over the dense layer's update of
    the residual stream (what this layer itself lost); ``accumulated``: along the pruned model, error
    over the dense output's norm.
    """
    spec = detect_spec(dense)
    inputs, outputs = {}, {}

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    def run(model, record, replace=None):
        handles = []
        for i, layer in enumerate(spec.decoder_layers(model)):
            def pre(module, args, kwargs, i=i):
                if replace is None:
                    inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
                    return None
                if args:
                    return (replace[i], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": replace[i]}

            def post(module, args, kwargs, output, i=i):
                record[i] = first(output).detach()

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        try:
            with torch.no_grad():
                model(input_ids=windows, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()

    run(dense, outputs)
    dense_inputs = dict(inputs)
    along, local = {}, {}
    run(pruned, along)
    run(pruned, local, replace=dense_inputs)
    n = len(outputs)
    return {"local": [round(float((local[i] - outputs[i]).norm() / (outputs[i] - dense_inputs[i]).norm()), 4)
                      for i in range(n)],
            "accumulated": [round(float((along[i] - outputs[i]).norm() / outputs[i].norm()), 4) for i in range(n)]}


def allocation_study(dense, stream, calibration, holdout, ratios, labels, shift, out) -> int:
    from pathlib import Path

    rows = list(stream[: 256 * 128].view(256, 128).split(4))  # the refit's rows: the first 128 (256 if asked)
    path = Path(out)
    results = json.loads(path.read_text()) if path.exists() else {}
    command = "python benchmarks/holdout_selection.py allocation --ratios " + ",".join(f"{r:g}" for r in ratios) + (
        "" if labels == list(ALLOCATION) else f' --configs "{",".join(labels)}"')
    results.pop("command", None)
    results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
    if "dense" not in results:
        results["dense"] = {"holdout": perplexity(dense, holdout, seq_len=128)["perplexity"],
                            "python docstrings": perplexity(dense, shift, seq_len=128)["perplexity"]}
    print(f"dense {results['dense']}", flush=True)
    scores = Pruner(dense, progress=False).score(calibration)
    table = UnitTable(dense, detect_spec(dense))
    diagnostic_windows = holdout[: 8 * 128].view(8, 128)
    for ratio in ratios:
        for label in labels:
            options, variant = ALLOCATION[label]
            key = f"{ratio:g} {label}"
            pruned = copy.deepcopy(dense)
            start = time.perf_counter()
            pruner = Pruner(pruned, ratio=ratio, progress=False, **options)
            if variant is not None:  # the same global allocation, its layer weights changed
                pruner.allocator = VariantAllocator(**variant, **pruner.allocator.options)
            plan = pruner.plan(calibration, scores=scores)
            samples = pruner.stages[0].samples if pruner.stages else 0
            pruner.apply(plan, calibration=rows[: max(samples // 4, 1)])
            entry = {"holdout": perplexity(pruned, holdout, seq_len=128)["perplexity"],
                     "python docstrings": perplexity(pruned, shift, seq_len=128)["perplexity"],
                     "removed": plan.params["prunable_fraction_removed"],
                     "seconds": round(time.perf_counter() - start, 1),
                     "kept": kept_fractions(plan, table),
                     "blocks_removed": [[p.index, [str(b) for b in p.removed_blocks()]] for p in plan.layers
                                        if p.removed_blocks()],
                     "block_importance": plan.block_scores}
            if label == "default":
                entry["errors"] = layer_errors(dense, pruned, diagnostic_windows)
            results[key] = entry
            print(f"{key}: holdout {entry['holdout']:.2f}, docstrings {entry['python docstrings']:.2f}, "
                  f"removed {entry['removed']:.4f} ({entry['seconds']:.0f} s)", flush=True)
            path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
