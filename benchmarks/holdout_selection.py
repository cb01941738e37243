"""How adaprune's defaults were chosen: perplexity on a hold-out of the CALIBRATION split, never on test text.

    python benchmarks/holdout_selection.py reconstruction --ratios 0.2,0.5
    python benchmarks/holdout_selection.py defaults --ratios 0.2,0.5
    python benchmarks/holdout_selection.py anchor --ratios 0.2,0.5
    python benchmarks/holdout_selection.py iterative --ratios 0.5 --steps 2

SmolLM2-135M; calibration = the first 32 windows of 128 tokens of the Wikipedia calibration stream,
hold-out = windows 300-363 of the same stream (disjoint tokens). One calibration pass serves every
configuration (a score cache); each prunes a fresh copy of the dense model. 1 thread.

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
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from adaprune import Pruner
from adaprune.plugins import detect_spec
from adaprune.tools.data import _token_stream, load_smollm2, wiki_texts
from adaprune.tools.evaluate import perplexity
from adaprune.units.table import UnitTable

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
    parser.add_argument("study", choices=("reconstruction", "defaults", "anchor", "iterative"))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the study's configurations")
    parser.add_argument("--steps", type=int, default=2, help="iterative: prunes to reach each ratio")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    stream = torch.tensor(_token_stream(tokenizer, wiki_texts("calibration"), max_tokens=128 * 400))
    calibration = list(stream[: 32 * 128].view(32, 128).split(4))
    holdout = stream[300 * 128: 364 * 128]
    if args.study == "anchor":
        return anchor_study(model, tokenizer, stream, calibration, holdout, [float(r) for r in args.ratios.split(",")],
                            args.configs.split(",") if args.configs else list(ANCHOR))
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


if __name__ == "__main__":
    raise SystemExit(main())
