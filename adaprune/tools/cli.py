"""The command line: `adaprune prune`, `eval`, `recover`, `export`, `report`, `demo`. Its defaults are the API's (`adaprune.pipeline.DEFAULTS`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..errors import AdapruneError
from ..io import check_output_folder, check_writable_file, write_text
from ..pipeline import DEFAULTS
from ..plan import PLAN_FILE


def load_model(path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               offload: bool = False):
    """A causal LM and its tokenizer from a checkpoint folder or a GGUF file.

    With `offload` the model is built on the meta device: its weights stay in the folder's
    safetensors files, for the Pruner to stream (adaprune.streaming).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(path)
    if not source.exists():
        raise AdapruneError(f"{path} does not exist: give a checkpoint folder (config.json and weights) or a "
                            ".gguf file.")
    if source.is_file() and source.suffix != ".gguf":
        raise AdapruneError(f"{path} is a file, not a checkpoint: give a checkpoint folder (config.json and "
                            "weights) or a .gguf file.")
    config_file = source / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AdapruneError(f"{config_file} is not valid JSON ({error}); the checkpoint is damaged, save it again "
                                "with model.save_pretrained(folder).") from error
        if not trust_remote_code and isinstance(config, dict) and "auto_map" in config:
            # Stock transformers would quietly build the unpruned layer shapes and leave weights missing.
            raise AdapruneError(f"{path} brings its own modeling file (a pruned model whose layers differ, or that "
                                "lost whole blocks); pass --trust-remote-code to load it.")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if offload and source.suffix == ".gguf":
        raise AdapruneError(f"--offload streams layers from safetensors files, and {path} is a GGUF file: convert it "
                            "once (adaprune.tools.data.load_smollm2 shows how), or drop --offload.")
    if source.suffix == ".gguf":
        kwargs["gguf_file"] = source.name
        source = source.parent
    try:
        if offload:
            from ..streaming import CheckpointWeights, empty_model

            CheckpointWeights(source)  # no safetensors files: refused before building anything
            model = empty_model(source, trust_remote_code, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    except AdapruneError:
        raise
    except Exception as error:  # a damaged checkpoint fails in many ways (safetensors, shapes, configs)
        raise AdapruneError(f"Could not load a causal language model from {path} ({type(error).__name__}: "
                            f"{error}); give a transformers checkpoint folder or a .gguf file.") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as error:
        raise AdapruneError(f"{path} holds no usable tokenizer ({type(error).__name__}: {error}); save one next to "
                            "the model (tokenizer.save_pretrained(folder)).") from error
    return model, tokenizer


def read_texts(path: str, option: str = "--text") -> list[str]:
    """Texts from a file: a JSON list of strings, or plain text split on blank lines. Refuses an empty file."""
    source = Path(path)
    if source.is_dir():
        raise AdapruneError(f"{option} {path} is a folder; give a text file (paragraphs split by blank lines) or a "
                            "JSON list of strings.")
    if not source.is_file():
        raise AdapruneError(f"{path} does not exist: give a text file (paragraphs split by blank lines) or a "
                            "JSON list of strings.")
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AdapruneError(f"{option} {path} is not UTF-8 text (byte {error.start} cannot be read; a binary "
                            "file?); give plain UTF-8 text or a JSON list of strings.") from error
    if path.endswith(".json"):
        try:
            texts = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise AdapruneError(f"{path} is not valid JSON ({error}); give a JSON list of strings, or plain text "
                                "in a file not named .json.") from error
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise AdapruneError(f"{path}: expected a JSON list of strings.")
        texts = [t for t in texts if t.strip()]
    else:
        texts = [part.strip() for part in text.split("\n\n") if part.strip()]
    if not texts:
        raise AdapruneError(f"{option} {path} holds no text (it is empty or only whitespace); give a file with "
                            "some text.")
    return texts


def _calibration_texts(path: str | None) -> list[str]:
    if path:
        return read_texts(path, "--calib")
    from .data import wiki_texts

    return wiki_texts("calibration")


def _at_least(option: str, value: int | None, low: int = 1) -> None:
    if value is not None and value < low:
        raise AdapruneError(f"{option} must be at least {low}, got {value}.")


def check_ratio(ratio: float, option: str = "--ratio") -> float:
    """A fraction of prunable parameters in [0, 1): checked before the model is loaded."""
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise AdapruneError(f"{option} must be in [0, 1), got {ratio:g}: it is the fraction of prunable parameters "
                            "to remove (0.2 removes a fifth).")
    return ratio


def _json_object(option: str, text: str | None, example: str) -> dict[str, Any]:
    """A JSON object given on the command line, or {}; anything else is refused naming the option."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapruneError(f"{option} is not valid JSON ({error}); give an object, e.g. '{example}'.") from error
    if not isinstance(value, dict):
        raise AdapruneError(f"{option} must be a JSON object, e.g. '{example}', got {type(value).__name__}.")
    return value


def _estimator_specs(names: str, options_json: str | None) -> list[dict[str, Any]]:
    """--estimators and --estimator-options as Pruner estimator specs, each checked (name, options) now."""
    from ..plugins import parse_estimator

    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if not chosen:
        raise AdapruneError("--estimators is empty; name at least one, e.g. --estimators taylor "
                            "(adaprune.list_estimators() lists them).")
    options: Any = {}
    if options_json:
        try:
            options = json.loads(options_json)
        except json.JSONDecodeError as error:
            raise AdapruneError(f"--estimator-options is not valid JSON ({error}); give an object of options per "
                                'estimator, e.g. \'{"taylor": {"order": 2}}\'.') from error
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise AdapruneError("--estimator-options must be a JSON object mapping estimator names to objects of "
                                'options, e.g. \'{"taylor": {"order": 2}}\'.')
        stray = sorted(set(options) - set(chosen))
        if stray:
            raise AdapruneError(f"--estimator-options has options for {', '.join(stray)}, which --estimators does "
                                f"not name (it names {', '.join(chosen)}); add it to --estimators or fix the name.")
    specs = [{"name": name, **options.get(name, {})} for name in chosen]
    for spec in specs:
        parse_estimator(spec)  # unknown names and refused options fail here, before the model loads
    return specs


def check_prune_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no model: run before loading it, so that a typo costs nothing."""
    from ..plugins import create_allocator, create_policy
    from ..vocabulary import parse_units

    check_ratio(args.ratio)
    _at_least("--samples", args.samples)
    _at_least("--seq-len", args.seq_len, 2)
    _at_least("--batch-size", args.batch_size)
    _at_least("--multiple", args.multiple)
    estimators = _estimator_specs(args.estimators, args.estimator_options)
    fusion_options = _json_object("--fusion-options", args.fusion_options, '{"steps": 8}')
    create_policy(args.fusion, **fusion_options)
    create_allocator(args.allocation)
    units = parse_units([unit.strip() for unit in args.units.split(",") if unit.strip()])
    reconstruct: bool | dict[str, Any] = args.reconstruct
    if args.reconstruct_options:
        if not args.reconstruct:
            raise AdapruneError("--reconstruct-options is given with --no-reconstruct; drop one of them.")
        reconstruct = _json_object("--reconstruct-options", args.reconstruct_options, '{"damping": 0.01}')
        from ..stages.reconstruct import OPTIONS, ReconstructStage

        try:
            ReconstructStage(**reconstruct)
        except (TypeError, ValueError) as error:
            raise AdapruneError(f"--reconstruct-options {reconstruct} are not understood ({error}); it takes "
                                f"{', '.join(OPTIONS)}.") from error
    if not Path(args.model).exists():
        raise AdapruneError(f"{args.model} does not exist: give a checkpoint folder (config.json and weights) or a "
                            ".gguf file.")
    inputs = [args.model] + ([args.calib] if args.calib else [])
    check_output_folder(args.out, "--out", overwrite=args.overwrite, inputs=[args.model])
    if args.report:
        check_writable_file(args.report, "--report", inputs=inputs)
        if Path(args.report).resolve() == Path(args.out).resolve():
            raise AdapruneError("--report and --out name the same path; give the report its own file name.")
    texts = _calibration_texts(args.calib)
    return {"estimators": estimators, "units": [str(unit) for unit in units], "texts": texts,
            "fusion_options": fusion_options, "reconstruct": reconstruct}


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

    checked = check_prune_arguments(args)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, args.trust_remote_code, offload=args.offload)
    load_seconds = time.perf_counter() - start
    params_before = sum(p.numel() for p in model.parameters())
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and args.seq_len > positions:
        raise AdapruneError(f"--seq-len {args.seq_len} is longer than the model's max_position_embeddings "
                            f"({positions}); give --seq-len {positions} or less.")
    try:
        batches = token_batches(tokenizer, checked["texts"], seq_len=args.seq_len, num_samples=args.samples,
                                batch_size=args.batch_size)
    except ValueError as error:
        raise AdapruneError(f"{error}; give more text with --calib, or lower --samples or --seq-len.") from error
    pruner = Pruner(model, ratio=args.ratio, estimators=checked["estimators"], fusion=args.fusion,
                    fusion_options=checked["fusion_options"], reconstruct=checked["reconstruct"],
                    allocation=args.allocation, units=checked["units"], mode="slice", layers=args.layers,
                    multiple=args.multiple, offload=args.model if args.offload else None)
    plan = pruner.plan(batches)
    if not distributed.is_main():
        return 0  # every rank planned the same; rank 0 applies, reconstructs and saves
    out = Path(args.out)
    refit_rows = _reconstruction_rows(pruner, tokenizer, checked["texts"], args, token_batches)
    # The checkpoint appears whole or not at all; an old one (--overwrite) goes only once the new one is complete.
    pruner.save(plan, out, tokenizer, overwrite=True, calibration=refit_rows)
    report = pruner.report(plan)
    report["stage_seconds"] = {"load": round(load_seconds, 3), **report["stage_seconds"]}
    if args.report:
        write_text(args.report, json.dumps(report, indent=1))
    print(f"pruned {params_before:,} -> {report['params_after']:,} parameters "
          f"({report['fraction_removed']:.1%} removed; {report['prunable_fraction_removed']:.1%} of the prunable "
          f"ones for ratio {args.ratio:g}); saved to {out}")
    return 0


def _reconstruction_rows(pruner, tokenizer, texts: list[str], args: argparse.Namespace,
                         token_batches) -> list | None:
    """The calibration rows the reconstruction reads: more than the plan's when the text has them.

    On the calibration hold-out the plan was best from 32 rows and the refit from 128 (its default
    `samples`; docs/pipeline.md §9), so the refit reads the same stream further on. None (the plan's
    own rows) when there is no reconstruction or it wants no more rows.
    """
    from ..stages.reconstruct import ReconstructStage

    wanted = max((stage.samples for stage in pruner.stages if isinstance(stage, ReconstructStage)), default=0)
    if wanted <= args.samples:
        return None
    try:
        return token_batches(tokenizer, texts, seq_len=args.seq_len, num_samples=wanted, batch_size=args.batch_size)
    except ValueError:  # a short text: the refit reads the plan's rows
        print(f"note: the calibration text holds fewer than {wanted} windows of {args.seq_len} tokens; the "
              f"reconstruction reads the plan's {args.samples} (give more text with --calib for a better refit).",
              file=sys.stderr)
        return None


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity over windows of a text file, multiple-choice accuracy, the zero-shot suite, lm-eval tasks."""
    from .data import _token_stream
    from .evaluate import load_mc_task, multiple_choice, perplexity

    if args.seq_len < 2:
        raise AdapruneError(f"--seq-len must be at least 2 (a window predicts all its tokens but the first), "
                            f"got {args.seq_len}.")
    for option, value in (("--limit", args.limit), ("--max-windows", args.max_windows),
                          ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise AdapruneError(f"{option} must be a positive number, got {value}.")
    if args.mc and args.text is None:
        raise AdapruneError("--mc is scored beside the perplexity of --text; give --text FILE too, or put the task in "
                            "a suite file and use --suite.")
    if args.text is None and not (args.suite or args.lm_eval or args.speed):
        raise AdapruneError("nothing to evaluate: give --text FILE (perplexity), --suite FILE_OR_NAME (the zero-shot "
                            "suite, e.g. --suite candidates), --lm-eval TASKS or --speed (tokens per second).")
    suite = None
    if args.suite:  # read before the model loads, so that a bad suite or a missing task fails fast
        from .suite import check_suite_files, load_suite

        suite = load_suite(args.suite)
        check_suite_files(suite, args.data_dir)
    if args.json:
        inputs = [args.model] + [path for path in (args.text, args.mc) if path]
        check_writable_file(args.json, "--json", inputs=inputs)
    examples = None
    if args.mc:  # read before the model loads, so that a bad task fails fast
        if not Path(args.mc).is_file():
            raise AdapruneError(f"{args.mc} does not exist: give a BIG-bench multiple-choice JSON task "
                                "(an 'examples' list with 'input' and 'target_scores').")
        try:
            Path(args.mc).read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise AdapruneError(f"--mc {args.mc} is not UTF-8 text (a binary file?); give a BIG-bench "
                                "multiple-choice JSON task.") from error
        try:
            examples = load_mc_task(args.mc)
        except ValueError as error:
            raise AdapruneError(f"{error}; give a BIG-bench multiple-choice JSON task (an 'examples' list, each "
                                "with an 'input' and 'target_scores' mapping every choice to a score).") from error
    if args.speed_baseline and not args.speed:
        raise AdapruneError("--speed-baseline needs --speed.")
    if args.reference and not (args.mc or args.suite):
        raise AdapruneError("--reference compares multiple-choice answers: give --mc TASK or --suite FILE_OR_NAME too.")
    if args.reference and not Path(args.reference).exists():
        raise AdapruneError(f"--reference {args.reference} does not exist: give the dense checkpoint folder (or "
                            ".gguf file) the pruned model came from.")
    if args.text is None and args.speed and not (args.suite or args.lm_eval):
        return _eval_speed(args)
    texts = read_texts(args.text) if args.text is not None else None
    if not Path(args.model).exists():
        raise AdapruneError(f"{args.model} does not exist: give a checkpoint folder (config.json and weights) or a "
                            ".gguf file.")
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    positions = getattr(model.config, "max_position_embeddings", None)
    if texts is not None and isinstance(positions, int) and args.seq_len > positions:
        raise AdapruneError(f"--seq-len {args.seq_len} is longer than the model's max_position_embeddings "
                            f"({positions}); give --seq-len {positions} or less.")
    result: dict[str, Any] = {"model": args.model, "params": sum(p.numel() for p in model.parameters())}
    summary = ""
    reference = None
    if args.reference:
        reference, reference_tokenizer = load_model(args.reference, args.trust_remote_code)
        if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise AdapruneError(f"--reference {args.reference} has another tokenizer than {args.model}: the "
                                "comparison scores both on the same tokens; give the model it was pruned from.")
        result["reference"] = args.reference
    if texts is not None:
        # Documents joined by blank lines, as the calibration and test streams of adaprune.data are.
        ids = torch.tensor(_token_stream(tokenizer, texts), dtype=torch.long)
        if ids.numel() < args.seq_len:
            raise AdapruneError(f"{args.text} has {ids.numel()} tokens, fewer than one window of --seq-len "
                                f"{args.seq_len}: give more text or a shorter --seq-len.")
        result.update({"text": args.text, "seq_len": args.seq_len})
        result.update(perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_windows=args.max_windows))
        summary = (f"perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens "
                   f"({result['windows']} windows of {args.seq_len})")
    if examples is not None:
        result.update(multiple_choice(model, tokenizer, examples, limit=args.limit, reference=reference))
        result["mc_task"] = args.mc
        summary += (f"; multiple choice {result['accuracy']:.1%} ± {result['accuracy_stderr']:.1%}, "
                    f"length-normalised {result['accuracy_norm']:.1%} ± {result['accuracy_norm_stderr']:.1%} "
                    f"on {result['items']} items")
        if reference is not None:
            summary += (f"; against the reference {result['accuracy_delta']:+.1%} ± "
                        f"{result['accuracy_delta_stderr']:.1%}"
                        f" (length-normalised {result['accuracy_norm_delta']:+.1%} ± "
                        f"{result['accuracy_norm_delta_stderr']:.1%}, paired), same choice on "
                        f"{result['agreement']:.1%} of the items")
    if suite is not None:
        from .suite import evaluate_suite, format_suite_table

        result["suite"] = evaluate_suite(model, tokenizer, suite, data_dir=args.data_dir, limit=args.limit,
                                         progress=True, reference=reference)
        print(format_suite_table(result["suite"]))
    if args.lm_eval:
        from .suite import lm_eval_evaluate

        result["lm_eval"] = lm_eval_evaluate(model, tokenizer, args.lm_eval.split(","),
                                             include_path=args.lm_eval_include, limit=args.limit,
                                             batch_size=args.batch_size)
        for task, metrics in result["lm_eval"]["results"].items():
            print(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    if args.speed:
        result["speed"] = _speed(model, args)
        summary += "\n" + _speed_summary(result["speed"])
    if args.json:
        write_text(args.json, json.dumps(result, indent=1, default=str))
        summary += ("; " if summary else "") + f"written to {args.json}"
    if summary:
        print(summary)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    """LoRA recovery of a pruned checkpoint (adaprune.recover), saved as a new checkpoint, atomically."""
    import shutil

    from ..io import atomic_directory
    from ..stages.recover import RecoveryReport, mean_loss, recover
    from .data import token_batches

    source, out = Path(args.model), Path(args.out)
    if out.resolve() == source.resolve():
        raise AdapruneError(f"--out {args.out} is the input checkpoint; give another folder (the input is "
                            "left untouched).")
    if out.exists() and not out.is_dir():
        raise AdapruneError(f"--out {args.out} is a file; give a folder for the recovered checkpoint.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise AdapruneError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it, or "
                            "give another folder.")
    if args.objective == "kl" and not args.teacher:
        raise AdapruneError("--objective kl distils from the dense model: pass --teacher DENSE (the unpruned "
                            "checkpoint), or use --objective lm.")
    for option, value in (("--steps", args.steps), ("--rank", args.rank), ("--samples", args.samples),
                          ("--batch-size", args.batch_size)):
        if value < 1:
            raise AdapruneError(f"{option} must be a positive number, got {value}.")
    if args.seq_len < 2:
        raise AdapruneError(f"--seq-len must be at least 2 (the loss predicts the next token), got {args.seq_len}.")
    if args.generated is not None and args.generated < 0:
        raise AdapruneError(f"--generated must be 0 or more windows, got {args.generated}.")
    if args.generated and not args.teacher:
        raise AdapruneError("--generated samples text from the dense model: pass --teacher DENSE too, or drop "
                            "--generated.")
    texts = _calibration_texts(args.text)
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    teacher = load_model(args.teacher, args.trust_remote_code)[0] if args.teacher else None
    try:
        batches = token_batches(tokenizer, texts, seq_len=args.seq_len, num_samples=args.samples,
                                batch_size=args.batch_size)
    except ValueError as error:
        raise AdapruneError(f"{error}; give more text with --text, or fewer --samples or a shorter "
                            "--seq-len.") from error
    report = RecoveryReport()
    recover(model, batches, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
            batch_size=args.batch_size, objective=args.objective, teacher=teacher, generated=args.generated,
            seed=args.seed, report=report)
    record = {"input": str(source), "teacher": args.teacher, "text": args.text or "wikipedia calibration split",
              **report.to_dict()}
    with atomic_directory(out, overwrite=out.exists()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (source / PLAN_FILE).is_file():
            shutil.copy2(source / PLAN_FILE, tmp / PLAN_FILE)
        write_text(tmp / "adaprune_recovery.json", json.dumps(record, indent=1))
    if args.report:
        write_text(args.report, json.dumps(record, indent=1))
    print(f"recovered with {report.settings['objective']} for {report.steps} steps ({report.tokens:,} tokens, "
          f"{report.seconds:.0f} s): loss {mean_loss(report.losses[:10]):.4f} -> {mean_loss(report.losses):.4f} "
          f"(mean of 10 steps); saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a (pruned) checkpoint as a GGUF file for llama.cpp."""
    from ..export.gguf import DTYPES, export_gguf

    if args.type not in DTYPES:
        raise AdapruneError(f"--type must be one of {', '.join(DTYPES)}, got {args.type!r}.")
    model, tokenizer = load_model(args.model, args.trust_remote_code)
    # A model read from a GGUF file keeps that file's tokenizer metadata (chat template, special tokens).
    source = args.metadata_from or (args.model if args.model.endswith(".gguf") else None)
    path = export_gguf(model, tokenizer, args.gguf, dtype=args.type, source_gguf=source)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type}); run it with llama.cpp, "
          f"e.g. llama-cli -m {path}")
    return 0


def speed_report(model, baseline=None, rounds: int = 3) -> dict[str, Any]:
    """Generation and prompt-processing tokens/s of `model` (and of `baseline`, measured in alternation)."""
    import statistics

    from .demo import SPEEDS

    models = {"model": model} if baseline is None else {"baseline": baseline, "model": model}
    samples: dict[str, dict[str, list[float]]] = {name: {key: [] for key in SPEEDS} for name in models}
    for _ in range(rounds):  # in alternation: a noisy machine slows both alike
        for name, m in models.items():
            for key, (_, measure) in SPEEDS.items():
                samples[name][key].append(measure(m))
    result: dict[str, Any] = {name: {key: statistics.median(v) for key, v in values.items()}
                              for name, values in samples.items()}
    if baseline is not None:
        result["speedup"] = {key: result["model"][key] / result["baseline"][key] for key in SPEEDS}
    result["rounds"] = rounds
    return result


def _speed(model, args: argparse.Namespace) -> dict[str, Any]:
    baseline = load_model(args.speed_baseline, args.trust_remote_code)[0] if args.speed_baseline else None
    return speed_report(model, baseline)


def _speed_summary(speed: dict[str, Any]) -> str:
    from .demo import SPEEDS

    lines = []
    for key, (label, _) in SPEEDS.items():
        line = f"{label}: {speed['model'][key]:.1f}"
        if "speedup" in speed:
            line += f" (baseline {speed['baseline'][key]:.1f}; speed-up {speed['speedup'][key]:.2f}x)"
        lines.append(line)
    lines.append(f"(medians of {speed['rounds']} rounds" +
                 (", model and baseline in alternation)" if "speedup" in speed else ")"))
    return "\n".join(lines)


def _eval_speed(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, args.trust_remote_code)
    result = {"model": args.model, "params": sum(p.numel() for p in model.parameters()), "speed": _speed(model, args)}
    summary = _speed_summary(result["speed"])
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
        summary += f"\nwritten to {args.json}"
    print(summary)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print a plan's per-layer table; with --plot, draw it."""
    from .plan_view import load_plan, plan_table, plot_plan

    if args.plot:
        check_writable_file(args.plot, "--plot", inputs=[args.plan])
    plan = load_plan(args.plan)
    print(plan_table(plan))
    if args.plot:
        print(f"plot written to {plot_plan(plan, args.plot)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    check_ratio(args.ratio)
    return run_demo(out=args.out, ratio=args.ratio, overwrite=args.overwrite)


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
                       help='JSON options of the reconstruction, e.g. \'{"damping": 0.3, "anchor": "dense"}\' (the defaults)')
    prune.add_argument("--calib", default=None,
                       help="calibration text: JSON list of strings or text split on blank lines "
                            "(default: the Wikipedia calibration split)")
    prune.add_argument("--samples", type=int, default=32, help="calibration samples")
    prune.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    prune.add_argument("--batch-size", type=int, default=4)
    prune.add_argument("--out", required=True, help="folder for the pruned checkpoint (new, or empty)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty --out (only once the new checkpoint is complete)")
    prune.add_argument("--report", default=None, help="write the report JSON here")
    prune.add_argument("--trust-remote-code", action="store_true")
    prune.add_argument("--offload", action="store_true",
                       help="for a model larger than memory: keep its weights in its safetensors files and load one "
                            "decoder layer at a time to score, train the fusion, reconstruct, slice and save "
                            "(docs/scale.md)")
    prune.add_argument("--dist-timeout", type=float, default=1800.0,
                       help="under torchrun: seconds a rank waits for the others before failing "
                            "(env ADAPRUNE_DIST_TIMEOUT overrides)")
    prune.set_defaults(func=cmd_prune)

    evaluate = sub.add_parser("eval", help="perplexity on a text file; with --mc multiple-choice accuracy; "
                                          "with --suite the zero-shot suite; with --lm-eval lm-eval tasks")
    evaluate.add_argument("model", help="checkpoint folder or .gguf file")
    evaluate.add_argument("--text", default=None,
                          help="text: JSON list of strings, or plain text whose documents are split by blank lines "
                               "(needed unless --suite, --lm-eval or --speed is given)")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per non-overlapping window")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (and lm-eval's batch size)")
    evaluate.add_argument("--max-windows", type=int, default=None, help="use at most this many windows")
    evaluate.add_argument("--mc", default=None, help="BIG-bench multiple-choice JSON task (target_scores)")
    evaluate.add_argument("--limit", type=int, default=None,
                          help="score only the first N multiple-choice items (of --mc, of each --suite or --lm-eval task)")
    evaluate.add_argument("--suite", default=None,
                          help="zero-shot suite: a suite JSON file or a built-in name (candidates, zero_shot); prints each task's "
                               "accuracy and the average")
    evaluate.add_argument("--data-dir", default=None,
                          help="folder the suite's task paths are relative to (default: $ADAPRUNE_DATA, else "
                               "../shared/data beside the checkout)")
    evaluate.add_argument("--lm-eval", default=None,
                          help="comma-separated lm-eval task names, run through lm-eval's HF model class "
                               "(pip install adaprune[eval])")
    evaluate.add_argument("--lm-eval-include", default=None, help="folder of extra lm-eval task YAML files")
    evaluate.add_argument("--json", default=None, help="write the results JSON here")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="allow the modeling file a pruned checkpoint brings (layers that differ)")
    evaluate.add_argument("--reference", default=None, metavar="DENSE",
                          help="with --mc or --suite: score the dense model on the same items and report the "
                               "difference with its paired standard error, how often both pick the same "
                               "choice, and the KL between their choice distributions")
    evaluate.add_argument("--speed", action="store_true",
                          help="also measure generation (batch 1) and prompt-processing tokens/s in PyTorch")
    evaluate.add_argument("--speed-baseline", default=None, metavar="DENSE",
                          help="with --speed: measure this model too, in alternation, and report speed-ups")
    evaluate.set_defaults(func=cmd_eval)

    recover = sub.add_parser("recover", help="LoRA recovery of a pruned checkpoint (adapters merged back)")
    recover.add_argument("model", help="the pruned checkpoint folder")
    recover.add_argument("--text", default=None,
                         help="training text: JSON list of strings or text split on blank lines "
                              "(default: the Wikipedia calibration split)")
    recover.add_argument("--out", required=True, help="folder for the recovered checkpoint")
    recover.add_argument("--teacher", default=None, help="the dense checkpoint, for --objective kl (distillation)")
    recover.add_argument("--objective", choices=("kl", "lm"), default=None,
                         help="kl: KL to --teacher; lm: next-token loss (default: kl with --teacher, else lm)")
    recover.add_argument("--steps", type=int, default=200)
    recover.add_argument("--rank", type=int, default=8, help="LoRA rank")
    recover.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / rank)")
    recover.add_argument("--lr", type=float, default=1e-3)
    recover.add_argument("--samples", type=int, default=800, help="training windows of --seq-len tokens")
    recover.add_argument("--seq-len", type=int, default=128)
    recover.add_argument("--generated", type=int, default=None,
                         help="with --teacher: that many more windows sampled from the dense model itself join "
                              "the text (keeps more of what it does outside the text's domain; default: half "
                              "as many as --samples; docs/recovery.md)")
    recover.add_argument("--batch-size", type=int, default=4)
    recover.add_argument("--seed", type=int, default=0)
    recover.add_argument("--report", default=None, help="also write the recovery record JSON here")
    recover.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    recover.add_argument("--trust-remote-code", action="store_true",
                         help="allow the modeling file a pruned checkpoint brings (layers that differ)")
    recover.set_defaults(func=cmd_recover)

    export = sub.add_parser("export", help="write a (pruned) checkpoint as a GGUF file for llama.cpp")
    export.add_argument("model", help="checkpoint folder or .gguf file")
    export.add_argument("--gguf", required=True, help="the GGUF file to write")
    export.add_argument("--type", default="f16", help="tensor type: f16 (default), q8_0 or f32")
    export.add_argument("--metadata-from", default=None, metavar="GGUF",
                        help="the GGUF file the model came from: copy its tokenizer and chat template")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="allow the modeling file a pruned checkpoint brings (layers that differ)")
    export.set_defaults(func=cmd_export)

    report = sub.add_parser("report", help="print a plan per layer; with --plot, draw it")
    report.add_argument("plan", help="plan JSON, or a pruned checkpoint folder holding adaprune_plan.json")
    report.add_argument("--plot", default=None, help="draw kept fractions and fusion weights into this .png/.pdf/.svg "
                                                     "(needs pip install adaprune[plot])")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="prune the embedded SmolLM2-135M and show what it gained and lost")
    demo.add_argument("--ratio", type=float, default=DEFAULTS.ratio)
    demo.add_argument("--out", default="out/smollm2-pruned",
                      help="folder for the pruned checkpoint (an earlier demo's output there is replaced)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out even if it holds something else")
    demo.set_defaults(func=cmd_demo)
    return parser


def _one_line(error: BaseException) -> str:
    """The message on one line (errors quoted from other libraries may span several).

    A progress bar the error interrupted is closed first, so that the message starts its own line.
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdapruneError as error:
        print(f"adaprune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every output is written to a temporary sibling and renamed into place: none is half-written.
        print("adaprune: interrupted; outputs not yet complete were not written (earlier ones are intact).",
              file=sys.stderr)
        return 130
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        print(f"adaprune: error: {error.strerror or error}{where}; check the path, its permissions and the free "
              "disk space. Nothing half-written was left.", file=sys.stderr)
        return 2
    except SafetensorError as error:  # safetensors reports a failed write (a full disk) as its own error
        print(f"adaprune: error: {_one_line(error)}; check the free disk space and the path. Nothing half-written "
              "was left.", file=sys.stderr)
        return 2
    except Exception as error:  # a bug, not bad input: one line, with the way to the traceback
        if os.environ.get("ADAPRUNE_TRACEBACK"):
            raise
        print(f"adaprune: error: unexpected {type(error).__name__}: {_one_line(error)}. This is likely a bug in adaprune; "
              "rerun with ADAPRUNE_TRACEBACK=1 to see where, and report it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
