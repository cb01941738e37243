"""The command line: `adaprune prune`, `eval`, `report`, `demo`. Its defaults are the API's (`adaprune.pipeline.DEFAULTS`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapruneError
from ..io import write_text
from ..pipeline import DEFAULTS


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a checkpoint folder or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(path)
    if not source.exists():
        raise AdapruneError(f"{path} does not exist: give a checkpoint folder (config.json and weights) or a "
                            ".gguf file.")
    config_file = source / "config.json"
    if not trust_remote_code and config_file.is_file() and "auto_map" in json.loads(config_file.read_text()):
        # Stock transformers would quietly build the unpruned layer shapes and leave weights missing.
        raise AdapruneError(f"{path} brings its own modeling file (a pruned model whose layers differ, or that "
                            "lost whole blocks); pass --trust-remote-code to load it.")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.suffix == ".gguf":
        kwargs["gguf_file"] = source.name
        source = source.parent
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    except (OSError, ValueError) as error:
        raise AdapruneError(f"Could not load a causal language model from {path} ({error}); give a "
                            "transformers checkpoint folder or a .gguf file.") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as error:
        raise AdapruneError(f"{path} holds no usable tokenizer ({error}); save one next to the model "
                            "(tokenizer.save_pretrained(folder)).") from error
    return model, tokenizer


def read_texts(path: str) -> list[str]:
    """Texts from a file: a JSON list of strings, or plain text split on blank lines."""
    if not Path(path).is_file():
        raise AdapruneError(f"{path} does not exist: give a text file (paragraphs split by blank lines) or a "
                            "JSON list of strings.")
    text = Path(path).read_text()
    if path.endswith(".json"):
        try:
            texts = json.loads(text)
        except json.JSONDecodeError as error:
            raise AdapruneError(f"{path} is not valid JSON ({error}); give a JSON list of strings, or plain text "
                                "in a file not named .json.") from error
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise AdapruneError(f"{path}: expected a JSON list of strings.")
        return texts
    return [part.strip() for part in text.split("\n\n") if part.strip()]


def _calibration_texts(path: str | None) -> list[str]:
    if path:
        return read_texts(path)
    from .data import wiki_texts

    return wiki_texts("calibration")


def cmd_prune(args: argparse.Namespace) -> int:
    from .data import token_batches
    from ..pipeline import Pruner
    from ..scoring import distributed

    # Under torchrun (WORLD_SIZE > 1) the ranks share the calibration; see docs/scale.md.
    joined = distributed.init_from_env(distributed.timeout_from_env(args.dist_timeout))
    try:
        return _prune(args, Pruner, token_batches, distributed)
    finally:
        if joined:
            distributed.shutdown()


def _prune(args: argparse.Namespace, Pruner, token_batches, distributed) -> int:

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    load_seconds = time.perf_counter() - start
    params_before = sum(p.numel() for p in model.parameters())
    batches = token_batches(tokenizer, _calibration_texts(args.calib), seq_len=args.seq_len,
                            num_samples=args.samples, batch_size=args.batch_size)
    estimators = [{"name": name, **json.loads(args.estimator_options or "{}").get(name, {})}
                  for name in args.estimators.split(",")]
    pruner = Pruner(model, ratio=args.ratio, estimators=estimators, fusion=args.fusion,
                    fusion_options=json.loads(args.fusion_options or "{}"),
                    reconstruct=json.loads(args.reconstruct_options) if args.reconstruct and args.reconstruct_options
                    else args.reconstruct, allocation=args.allocation, units=args.units.split(","), mode="slice", layers=args.layers,
                    multiple=args.multiple)
    plan = pruner.plan(batches)
    if not distributed.is_main():
        return 0  # every rank planned the same; rank 0 applies, reconstructs and saves
    pruner.apply(plan)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    plan.save(out / "adaprune_plan.json")
    report = pruner.report(plan)
    report["stage_seconds"] = {"load": round(load_seconds, 3), **report["stage_seconds"]}
    if args.report:
        write_text(args.report, json.dumps(report, indent=1))
    print(f"pruned {params_before:,} -> {report['params_after']:,} parameters "
          f"({report['fraction_removed']:.1%} removed; {report['prunable_fraction_removed']:.1%} of the prunable "
          f"ones for ratio {args.ratio:g}); saved to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity over non-overlapping windows of a text file, and optionally multiple-choice accuracy."""
    from .data import _token_stream
    from .evaluate import load_mc_task, multiple_choice, perplexity

    if args.seq_len < 2:
        raise AdapruneError(f"--seq-len must be at least 2 (a window predicts all its tokens but the first), "
                            f"got {args.seq_len}.")
    for option, value in (("--limit", args.limit), ("--max-windows", args.max_windows),
                          ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise AdapruneError(f"{option} must be a positive number, got {value}.")
    examples = None
    if args.mc:  # read before the model loads, so that a bad task fails fast
        if not Path(args.mc).is_file():
            raise AdapruneError(f"{args.mc} does not exist: give a BIG-bench multiple-choice JSON task "
                                "(an 'examples' list with 'input' and 'target_scores').")
        try:
            examples = load_mc_task(args.mc)
        except ValueError as error:
            raise AdapruneError(f"{error}; give a BIG-bench multiple-choice JSON task (an 'examples' list, each "
                                "with an 'input' and 'target_scores' mapping every choice to a score).") from error
    texts = read_texts(args.text)
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    # Documents joined by blank lines, as the calibration and test streams of adaprune.data are.
    ids = torch.tensor(_token_stream(tokenizer, texts), dtype=torch.long)
    if ids.numel() < args.seq_len:
        raise AdapruneError(f"{args.text} has {ids.numel()} tokens, fewer than one window of --seq-len "
                            f"{args.seq_len}: give more text or a shorter --seq-len.")
    result: dict[str, Any] = {"model": args.model, "text": args.text, "seq_len": args.seq_len,
                              "params": sum(p.numel() for p in model.parameters())}
    result.update(perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size,
                             max_windows=args.max_windows))
    summary = (f"perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens "
               f"({result['windows']} windows of {args.seq_len})")
    if examples is not None:
        result.update(multiple_choice(model, tokenizer, examples, limit=args.limit))
        result["mc_task"] = args.mc
        summary += (f"; multiple choice {result['accuracy']:.1%} ± {result['accuracy_stderr']:.1%}, "
                    f"length-normalised {result['accuracy_norm']:.1%} ± {result['accuracy_norm_stderr']:.1%} "
                    f"on {result['items']} items")
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
        summary += f"; written to {args.json}"
    print(summary)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print a plan's per-layer table; with --plot, draw it."""
    from .plan_view import load_plan, plan_table, plot_plan

    plan = load_plan(args.plan)
    print(plan_table(plan))
    if args.plot:
        print(f"plot written to {plot_plan(plan, args.plot)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, ratio=args.ratio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaprune", description="Structured pruning of decoder-only LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a checkpoint folder or GGUF file and save a smaller checkpoint")
    prune.add_argument("model", help="checkpoint folder or .gguf file")
    prune.add_argument("--ratio", type=float, default=DEFAULTS.ratio, help="fraction of prunable parameters to remove")
    prune.add_argument("--estimators", default=",".join(DEFAULTS.estimators), help="comma-separated estimator names")
    prune.add_argument("--estimator-options", default=None,
                       help='JSON options per estimator, e.g. \'{"taylor": {"order": 2}}\'')
    prune.add_argument("--fusion", default=DEFAULTS.fusion, help="fusion policy (adaptive, coarse, fine, fixed, ...)")
    prune.add_argument("--fusion-options", default=None, help='JSON options of the fusion policy, e.g. \'{"steps": 8}\'')
    prune.add_argument("--allocation", default=DEFAULTS.allocation,
                       help="budget allocation across layers: uniform, or global (one ranking of all units)")
    prune.add_argument("--units", default=",".join(DEFAULTS.units),
                       help="kv_groups, query_heads, channels, and with --allocation global blocks "
                            "(or attention_blocks, mlp_blocks): whole blocks")
    prune.add_argument("--layers", default=DEFAULTS.layers,
                       help='eligible layers: "start:stop", or one index (default all)')
    prune.add_argument("--multiple", type=int, default=DEFAULTS.multiple, help="round kept MLP widths to this multiple")
    prune.add_argument("--no-reconstruct", dest="reconstruct", action="store_false", default=bool(DEFAULTS.reconstruct),
                       help="skip the weight reconstruction after the cut (on by default)")
    prune.add_argument("--reconstruct-options", default=None,
                       help='JSON options of the reconstruction, e.g. \'{"damping": 0.01, "target": "dense"}\'')
    prune.add_argument("--calib", default=None,
                       help="calibration text: JSON list of strings or text split on blank lines "
                            "(default: the Wikipedia calibration split)")
    prune.add_argument("--samples", type=int, default=32, help="calibration samples")
    prune.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    prune.add_argument("--batch-size", type=int, default=4)
    prune.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    prune.add_argument("--report", default=None, help="write the report JSON here")
    prune.add_argument("--trust-remote-code", action="store_true")
    prune.add_argument("--dist-timeout", type=float, default=1800.0,
                       help="under torchrun: seconds a rank waits for the others before failing "
                            "(env ADAPRUNE_DIST_TIMEOUT overrides)")
    prune.set_defaults(func=cmd_prune)

    evaluate = sub.add_parser("eval", help="perplexity on a text file and, with --mc, multiple-choice accuracy")
    evaluate.add_argument("model", help="checkpoint folder or .gguf file")
    evaluate.add_argument("--text", required=True,
                          help="text: JSON list of strings, or plain text whose documents are split by blank lines")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per non-overlapping window")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    evaluate.add_argument("--max-windows", type=int, default=None, help="use at most this many windows")
    evaluate.add_argument("--mc", default=None, help="BIG-bench multiple-choice JSON task (target_scores)")
    evaluate.add_argument("--limit", type=int, default=None, help="score only the first N multiple-choice items")
    evaluate.add_argument("--json", default=None, help="write the results JSON here")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="allow the modeling file a pruned checkpoint brings (layers that differ)")
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="print a plan per layer; with --plot, draw it")
    report.add_argument("plan", help="plan JSON, or a pruned checkpoint folder holding adaprune_plan.json")
    report.add_argument("--plot", default=None, help="draw kept fractions and fusion weights into this .png/.pdf/.svg "
                                                     "(needs pip install adaprune[plot])")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="prune the embedded SmolLM2-135M and show what it gained and lost")
    demo.add_argument("--ratio", type=float, default=DEFAULTS.ratio)
    demo.add_argument("--out", default="out/smollm2-pruned")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdapruneError as error:
        print(f"adaprune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
