"""How adaprune's defaults were chosen: perplexity on a hold-out of the CALIBRATION split, never on test text.

    python benchmarks/holdout_selection.py reconstruction --ratios 0.2,0.5
    python benchmarks/holdout_selection.py defaults --ratios 0.2,0.5

SmolLM2-135M; calibration = the first 32 windows of 128 tokens of the Wikipedia calibration stream,
hold-out = windows 300-363 of the same stream (disjoint tokens). One calibration pass serves every
configuration (a score cache); each prunes a fresh copy of the dense model. 1 thread.

* ``reconstruction``: Taylor, fixed 50/50 fusion, uniform allocation; no reconstruction against
  the reconstruction targets and dampings.
* ``defaults``: the adaptive fusion with reconstruction; Taylor alone or with the activation (and
  fluctuation) score as further candidates; uniform or global allocation.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from adaprune import Pruner
from adaprune.tools.data import _token_stream, load_smollm2, wiki_texts
from adaprune.tools.evaluate import perplexity

RECONSTRUCTION = {"none": False, "pruned 0.01": {"target": "pruned"}, "pruned 0.1": {"target": "pruned", "damping": 0.1},
                  "pruned 0.01 add_bias": {"target": "pruned", "add_bias": True}, "dense 0.01": {"target": "dense"}}
DEFAULTS = {"taylor uniform": (["taylor"], "uniform"), "taylor global": (["taylor"], "global"),
            "taylor+activation global": (["taylor", "activation"], "global"),
            "taylor+activation+fluctuation global": (["taylor", "activation", "fluctuation"], "global")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("reconstruction", "defaults"))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the study's configurations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    stream = torch.tensor(_token_stream(tokenizer, wiki_texts("calibration"), max_tokens=128 * 400))
    calibration = list(stream[: 32 * 128].view(32, 128).split(4))
    holdout = stream[300 * 128: 364 * 128]
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


if __name__ == "__main__":
    raise SystemExit(main())
