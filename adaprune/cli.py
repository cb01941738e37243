"""The command line: `adaprune prune`, `adaprune demo` (and the subcommands registered below)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import AdapruneError


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from a checkpoint folder or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.suffix == ".gguf":
        kwargs["gguf_file"] = source.name
        source = source.parent
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def read_texts(path: str) -> list[str]:
    """Texts from a file: a JSON list of strings, or plain text split on blank lines."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        texts = json.loads(text)
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
    from .pruner import Pruner

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    load_seconds = time.perf_counter() - start
    params_before = sum(p.numel() for p in model.parameters())
    batches = token_batches(tokenizer, _calibration_texts(args.calib), seq_len=args.seq_len,
                            num_samples=args.samples, batch_size=args.batch_size)
    estimators = [{"name": name, **json.loads(args.estimator_options or "{}").get(name, {})}
                  for name in args.estimators.split(",")]
    pruner = Pruner(model, ratio=args.ratio, estimators=estimators, fusion=args.fusion,
                    allocation=args.allocation, units=args.units.split(","), mode="slice", layers=args.layers,
                    multiple=args.multiple)
    plan = pruner.plan(batches)
    pruner.apply(plan)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    plan.save(out / "adaprune_plan.json")
    report = build_report(pruner, plan, params_before, load_seconds)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    print(f"pruned {params_before:,} -> {report['params_after']:,} parameters "
          f"({report['fraction_removed']:.1%} removed); saved to {out}")
    return 0


def build_report(pruner, plan, params_before: int, load_seconds: float = 0.0) -> dict[str, Any]:
    """The report of DESIGN.md: sizes, timings, memory, estimators, fusion weights, kept units."""
    params_after = sum(p.numel() for p in pruner.model.parameters())
    return {
        "params_before": params_before,
        "params_after": params_after,
        "fraction_removed": 1 - params_after / params_before,
        "prunable_fraction_removed": plan.params["removed"] / plan.params["prunable_before"],
        "stage_seconds": {"load": round(load_seconds, 3), **pruner.report["stages"]},
        "peak_memory_mb": pruner.report.get("peak_memory_mb"),
        "calibration": pruner.report.get("calibration"),
        "estimators": plan.settings["estimators"],
        "fusion": plan.fusion,
        "settings": plan.settings,
        "kept": plan.summary()["layers"],
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, ratio=args.ratio)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaprune", description="Structured pruning of decoder-only LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a checkpoint folder or GGUF file and save a smaller checkpoint")
    prune.add_argument("model", help="checkpoint folder or .gguf file")
    prune.add_argument("--ratio", type=float, default=0.2, help="fraction of prunable parameters to remove")
    prune.add_argument("--estimators", default="taylor", help="comma-separated estimator names")
    prune.add_argument("--estimator-options", default=None,
                       help='JSON options per estimator, e.g. \'{"taylor": {"order": 2}}\'')
    prune.add_argument("--fusion", default="fixed", help="fusion policy")
    prune.add_argument("--allocation", default="uniform", help="budget allocation across layers")
    prune.add_argument("--units", default="heads,channels", help="kv_groups|heads, query_heads, channels")
    prune.add_argument("--layers", default=None, help='eligible layers as "start:stop" (default all)')
    prune.add_argument("--multiple", type=int, default=8, help="round kept MLP widths to this multiple")
    prune.add_argument("--calib", default=None,
                       help="calibration text: JSON list of strings or text split on blank lines "
                            "(default: the Wikipedia calibration split)")
    prune.add_argument("--samples", type=int, default=32, help="calibration samples")
    prune.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    prune.add_argument("--batch-size", type=int, default=4)
    prune.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    prune.add_argument("--report", default=None, help="write the report JSON here")
    prune.add_argument("--trust-remote-code", action="store_true")
    prune.set_defaults(func=cmd_prune)

    demo = sub.add_parser("demo", help="prune the embedded SmolLM2-135M and show what it gained and lost")
    demo.add_argument("--ratio", type=float, default=0.2)
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
