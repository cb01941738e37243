"""Zero-shot multiple-choice suites: the paper's protocol of one average accuracy over several tasks.

A suite is a JSON file naming BIG-bench multiple-choice tasks by a path relative to a data folder, each
with its item limit, the metric it is averaged by (``accuracy`` or ``accuracy_norm``) and its chance
level. Built-in suites live in ``adaprune/suites/`` and are loaded by name (``load_suite("zero_shot")``).

Each item is scored as BIG-bench defines the task's prompt: ``task_prefix``, then
``example_input_prefix`` (default ``"\\nQ: "``), the input, the choices appended when the task says so
(``append_choices_to_input``, default true; ``choice_prefix`` default ``"\\n  choice: "``; sorted, so
the order is fixed and says nothing about the answer) and ``example_output_prefix`` (default
``"\\nA: "``); each choice is then scored by :func:`adaprune.evaluate.multiple_choice`.

The data folder is, in order: the ``data_dir=`` argument, the ``ADAPRUNE_DATA`` environment variable,
or ``../shared/data`` beside the checkout.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import AdapruneError

__all__ = [
    "DATA_ENV", "Suite", "SuiteTask", "available_suites", "chance_level", "check_suite_files", "choose_metric", "constant_baseline",
    "default_data_dir", "evaluate_suite", "format_suite_table", "load_suite", "load_task_examples",
    "lm_eval_evaluate", "suite_loglikelihoods",
]

DATA_ENV = "ADAPRUNE_DATA"
SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"  # adaprune/suites/
Metric = Literal["accuracy", "accuracy_norm"]
PromptFormat = Literal["bigbench", "plain"]
METRICS: tuple[str, ...] = ("accuracy", "accuracy_norm")


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: where it is, how many items, which metric, its chance level."""

    name: str
    path: str  # relative to the data folder
    metric: Metric = "accuracy_norm"
    limit: int | None = None  # the first items of the file; None: all
    chance: float | None = None  # mean over the scored items of (#correct choices / #choices)
    prompt: PromptFormat = "bigbench"


@dataclass(frozen=True)
class Suite:
    """A named list of tasks, averaged with equal weight."""

    name: str
    tasks: tuple[SuiteTask, ...]
    description: str = ""
    source: str = ""  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        """The JSON form :func:`load_suite` reads."""
        return {"name": self.name, "description": self.description, "tasks": [asdict(t) for t in self.tasks]}


def available_suites() -> list[str]:
    """Names of the built-in suites (files in ``adaprune/suites/``)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def _suite_error(where: str, problem: str) -> AdapruneError:
    return AdapruneError(f"{where}: {problem}; a suite is a JSON object {{\"name\": ..., \"tasks\": [{{\"name\": ..., "
                         "\"path\": \"relative/to/data/task.json\", \"metric\": \"accuracy\" or \"accuracy_norm\", "
                         "\"limit\": N}}, ...]}}.")


def load_suite(name_or_path: str | os.PathLike[str]) -> Suite:
    """A suite from a JSON file, or a built-in one by name (see :func:`available_suites`).

    Raises AdapruneError for an unknown name, a missing file or a malformed suite.
    """
    path = Path(name_or_path)
    if not path.is_file():
        builtin = SUITES_DIR / f"{name_or_path}.json"
        if not builtin.is_file():
            raise AdapruneError(f"{name_or_path} is neither a suite file nor a built-in suite; give a suite JSON "
                                f"path or one of: {', '.join(available_suites()) or '(none)'}.")
        path = builtin
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _suite_error(str(path), f"not valid JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
        raise _suite_error(str(path), "expected an object with a non-empty 'tasks' list")
    tasks = []
    for i, entry in enumerate(data["tasks"]):
        where = f"{path}: task {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise _suite_error(where, "each task needs a 'path'")
        unknown = set(entry) - {"name", "path", "metric", "limit", "chance", "prompt"}
        if unknown:
            raise _suite_error(where, f"unknown keys {sorted(unknown)}")
        metric = entry.get("metric", "accuracy_norm")
        if metric not in METRICS:
            raise _suite_error(where, f"metric must be 'accuracy' or 'accuracy_norm', got {metric!r}")
        limit = entry.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise _suite_error(where, f"limit must be a positive integer or null, got {limit!r}")
        prompt = entry.get("prompt", "bigbench")
        if prompt not in ("bigbench", "plain"):
            raise _suite_error(where, f"prompt must be 'bigbench' or 'plain', got {prompt!r}")
        name = entry.get("name") or Path(entry["path"]).parent.name or Path(entry["path"]).stem
        tasks.append(SuiteTask(name=name, path=entry["path"], metric=metric, limit=limit,
                               chance=entry.get("chance"), prompt=prompt))
    if len({t.name for t in tasks}) != len(tasks):
        raise _suite_error(str(path), "task names must be unique")
    return Suite(name=data.get("name") or path.stem, tasks=tuple(tasks), description=data.get("description", ""),
                 source=str(path))


def default_data_dir() -> Path:
    """``$ADAPRUNE_DATA`` if set, else ``../shared/data`` beside the checkout holding this package."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    package = next(p for p in Path(__file__).resolve().parents if p.name == "adaprune")
    return package.parent.parent / "shared" / "data"  # checkout/../shared/data


def _resolve(task: SuiteTask, data_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    path = Path(task.path) if Path(task.path).is_absolute() else root / task.path
    if not path.is_file():
        raise AdapruneError(f"task {task.name}: {path} does not exist; point the data folder at the folder that "
                            f"holds {task.path} (data_dir=..., --data-dir, or the {DATA_ENV} environment "
                            "variable).")
    return path


def check_suite_files(suite: Suite, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The task files of ``suite`` resolved against the data folder; AdapruneError naming the fix if one is missing."""
    return [_resolve(task, data_dir) for task in suite.tasks]


def _bigbench_prompt(task_json: dict[str, Any], example: dict[str, Any]) -> str:
    """The zero-shot prompt BIG-bench builds for one item (see the module docstring)."""
    text = task_json.get("example_input_prefix", "\nQ: ") + example["input"]
    if task_json.get("append_choices_to_input", True):
        choice_prefix = task_json.get("choice_prefix", "\n  choice: ")
        text += choice_prefix + choice_prefix.join(sorted(example["choices"]))
    text += task_json.get("example_output_prefix", "\nA: ")
    return (task_json.get("task_prefix", "") + text).lstrip()  # nothing comes before the prompt


def load_task_examples(path: str | os.PathLike[str], *, prompt: PromptFormat = "bigbench",
                       limit: int | None = None) -> list[dict[str, Any]]:
    """The items of a BIG-bench JSON task as ``{"input", "choices", "scores"}``, with the prompt built in.

    ``prompt="bigbench"`` builds BIG-bench's zero-shot prompt from the task's prefixes; ``"plain"``
    keeps the bare input (what ``adaprune eval --mc`` scores). ``limit`` keeps the first items.
    """
    from .evaluate import load_mc_task

    try:
        examples = load_mc_task(path)
    except ValueError as error:
        raise AdapruneError(f"{error}; give a BIG-bench multiple-choice JSON task (an 'examples' list, each with "
                            "an 'input' and 'target_scores').") from error
    examples = examples[:limit] if limit is not None else examples
    if prompt == "bigbench":
        task_json = json.loads(Path(path).read_text(encoding="utf-8"))
        examples = [{**e, "input": _bigbench_prompt(task_json, e)} for e in examples]
    return examples


def chance_level(examples: Sequence[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform random pick: mean over items of (#best choices / #choices)."""
    return sum(sum(s == max(e["scores"]) for s in e["scores"]) / len(e["scores"]) for e in examples) / len(examples)


def _label_set(examples: Sequence[dict[str, Any]]) -> frozenset[str] | None:
    """The task's fixed answer labels when every item offers the same choices (yes/no, True/False), else None."""
    labels = {frozenset(e["choices"]) for e in examples}
    return next(iter(labels)) if len(labels) == 1 else None


def constant_baseline(examples: Sequence[dict[str, Any]]) -> float:
    """The best accuracy of always giving the same answer, for tasks with a fixed label set.

    With free-text choices that differ per item no constant answer exists, and this is the chance level.
    """
    labels = _label_set(examples)
    if labels is None:
        return chance_level(examples)
    return max(sum(dict(zip(e["choices"], e["scores"]))[label] == max(e["scores"]) for e in examples)
               for label in labels) / len(examples)


def choose_metric(examples: Sequence[dict[str, Any]]) -> Metric:
    """The metric a task is averaged by, from its choices alone (never from accuracies).

    Fixed labels shared by every item (yes/no, True/False, entailment/non-entailment): raw accuracy,
    since dividing by a label's length only adds the same bias to every item. Free-text choices that
    differ per item: length-normalised accuracy, so that long answers are not penalised for their length.
    """
    return "accuracy" if _label_set(examples) is not None else "accuracy_norm"


def _suite_examples(suite: Suite | str | os.PathLike[str], data_dir: str | os.PathLike[str] | None,
                    limit: int | None) -> tuple[Suite, list[list[dict[str, Any]]]]:
    """The suite and every task's items, all files checked before any is read."""
    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    if limit is not None and limit < 1:
        raise AdapruneError(f"limit must be a positive number, got {limit}.")
    paths = check_suite_files(suite, data_dir)
    return suite, [load_task_examples(path, prompt=task.prompt, limit=limit if limit is not None else task.limit)
                   for task, path in zip(suite.tasks, paths)]


def suite_loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    suite: Suite | str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, list[list[float]]]:
    """Per task of ``suite``, :func:`adaprune.tools.evaluate.choice_loglikelihoods` of ``model`` on its items.

    Score the dense model once and pass the result as ``evaluate_suite(..., reference=...)`` for each pruned
    model (the same ``suite``, ``data_dir`` and ``limit``), instead of scoring it again every time.
    """
    from .evaluate import choice_loglikelihoods

    suite, tasks = _suite_examples(suite, data_dir, limit)
    return {task.name: choice_loglikelihoods(model, tokenizer, examples, progress=progress)
            for task, examples in zip(suite.tasks, tasks)}


def evaluate_suite(
    model: torch.nn.Module,
    tokenizer: Any,
    suite: Suite | str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    progress: bool = False,
    reference: torch.nn.Module | Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on every task of ``suite``, and the averages.

    ``limit`` replaces every task's own item limit (the results then differ from the suite's reference);
    ``progress`` shows a bar per task and a line on stderr as each task ends.
    Returns ``{"suite", "tasks": [{"name", "path", "items", "chance", "metric", "accuracy",
    "accuracy_stderr", "accuracy_norm", "accuracy_norm_stderr", "score", "score_stderr", "seconds"}],
    "average", "average_stderr", "average_accuracy", "average_accuracy_norm", "average_chance"}``:
    ``score`` is the task's own metric and ``average`` its equal-weight mean over tasks; the standard
    error of the average is ``sqrt(sum stderr^2) / tasks`` (tasks independent).

    ``reference`` (the dense model, sharing ``tokenizer``) is scored on the same items: each task then also
    has ``reference_score``, ``score_delta`` (this model's metric minus the reference's) with its paired
    standard error ``score_delta_stderr``, ``agreement`` (the share of items where both pick the same
    choice, by the task's metric) and ``choice_kl`` (see :func:`adaprune.tools.evaluate.multiple_choice`);
    the result ``reference_average``, ``average_delta``, ``average_delta_stderr`` and ``average_agreement``.
    ``reference`` may also be the dense model's :func:`suite_loglikelihoods` on the same suite and items,
    to score it once for many models.
    """
    from .evaluate import multiple_choice

    suite, tasks = _suite_examples(suite, data_dir, limit)  # every file checked before any scoring
    if isinstance(reference, Mapping):
        missing = [task.name for task in suite.tasks if task.name not in reference]
        if missing:
            raise AdapruneError(f"The reference scores have no task {', '.join(missing)} of suite "
                                f"{suite.name!r}: pass suite_loglikelihoods(dense, tokenizer, the same suite).")
    rows = []
    for task, examples in zip(suite.tasks, tasks):
        start = time.perf_counter()
        task_reference = reference[task.name] if isinstance(reference, Mapping) else reference
        scores = multiple_choice(model, tokenizer, examples, progress=progress, reference=task_reference)
        rows.append({
            "name": task.name, "path": task.path, "prompt": task.prompt, "items": scores["items"],
            "chance": chance_level(examples), "metric": task.metric,
            **{k: scores[k] for k in ("accuracy", "accuracy_stderr", "accuracy_norm", "accuracy_norm_stderr")},
            "score": scores[task.metric], "score_stderr": scores[f"{task.metric}_stderr"],
            **({} if reference is None else {
                "reference_score": scores[f"reference_{task.metric}"], "score_delta": scores[f"{task.metric}_delta"],
                "score_delta_stderr": scores[f"{task.metric}_delta_stderr"],
                "agreement": scores[task.metric.replace("accuracy", "agreement")], "choice_kl": scores["choice_kl"]}),
            "seconds": round(time.perf_counter() - start, 2),
        })
        if progress:
            r = rows[-1]
            print(f"{task.name}: {task.metric} {r['score']:.3f} ± {r['score_stderr']:.3f} on {r['items']} items "
                  f"(chance {r['chance']:.3f}, {r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    count = len(rows)
    result = {
        "suite": suite.name,
        "tasks": rows,
        "average": sum(r["score"] for r in rows) / count,
        "average_stderr": math.sqrt(sum(r["score_stderr"] ** 2 for r in rows)) / count,
        "average_accuracy": sum(r["accuracy"] for r in rows) / count,
        "average_accuracy_norm": sum(r["accuracy_norm"] for r in rows) / count,
        "average_chance": sum(r["chance"] for r in rows) / count,
    }
    if reference is not None:
        result.update({
            "reference_average": sum(r["reference_score"] for r in rows) / count,
            "average_delta": sum(r["score_delta"] for r in rows) / count,
            "average_delta_stderr": math.sqrt(sum(r["score_delta_stderr"] ** 2 for r in rows)) / count,
            "average_agreement": sum(r["agreement"] for r in rows) / count,
        })
    return result


def format_suite_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_suite`'s result: one row per task and the average."""
    lines = [f"{'task':<24} {'items':>5} {'chance':>6} {'acc':>13} {'acc_norm':>13}  metric"]
    for r in result["tasks"]:
        lines.append(f"{r['name']:<24} {r['items']:>5} {r['chance']:>6.3f} "
                     f"{r['accuracy']:>6.3f}±{r['accuracy_stderr']:.3f} "
                     f"{r['accuracy_norm']:>6.3f}±{r['accuracy_norm_stderr']:.3f}  {r['metric']}")
    lines.append(f"{'average (' + str(len(result['tasks'])) + ' tasks)':<24} {'':>5} {result['average_chance']:>6.3f} "
                 f"{result['average_accuracy']:>13.3f} {result['average_accuracy_norm']:>13.3f}")
    lines.append(f"suite {result['suite']}: average of each task's metric {result['average']:.4f} "
                 f"± {result['average_stderr']:.4f}")
    if "average_delta" in result:
        lines.append(f"{'against the reference':<24} {'ref':>6} {'delta':>15} {'agree':>6} {'choice KL':>9}")
        for r in result["tasks"]:
            lines.append(f"{r['name']:<24} {r['reference_score']:>6.3f} "
                         f"{r['score_delta']:>+8.3f}±{r['score_delta_stderr']:.3f} "
                         f"{r['agreement']:>6.3f} {r['choice_kl']:>9.4f}")
        lines.append(f"average: reference {result['reference_average']:.4f}, difference {result['average_delta']:+.4f} "
                     f"± {result['average_delta_stderr']:.4f} (paired), agreement {result['average_agreement']:.3f}")
    return "\n".join(lines)


def lm_eval_evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate an already-loaded model through lm-eval (EleutherAI's harness), zero-shot.

    The model object, pruned or not (a generated modeling file included), is wrapped in lm-eval's
    ``HFLM``; ``include_path`` is a folder of task YAML files (local tasks, e.g. on JSON files, which
    run offline). Returns lm-eval's ``{"results": {task: {metric: value}}, ...}`` (with ``samples``
    when ``log_samples``). Needs ``pip install adaprune[eval]``.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise AdapruneError(f"lm-eval is not installed ({error}); install it with pip install adaprune[eval] "
                            "(or pip install lm-eval).") from error
    if include_path is not None and not Path(include_path).is_dir():
        raise AdapruneError(f"{include_path} is not a folder; give the folder that holds the task YAML files.")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise AdapruneError(f"lm-eval knows no task {', '.join(unknown)}; name tasks lm-eval lists (lm-eval ls tasks) "
                            "or pass the folder of your task YAML files as include_path (--lm-eval-include).")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        output = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                                 log_samples=log_samples, bootstrap_iters=1000)  # acc: closed-form stderr
    except ConnectionError as error:  # datasets' offline or unreachable Hub error
        raise AdapruneError(f"lm-eval could not fetch the data of {', '.join(tasks)} ({error}); on a machine without "
                            "the Hub, define the task on local files (an lm-eval task YAML with dataset_path: json "
                            "and data_files) and pass its folder with --lm-eval-include.") from error
    if output is None:  # a non-zero rank under distributed runs; not the case here
        raise AdapruneError("lm-eval returned no results.")
    keep = ("results", "n-samples", "configs", "versions") + (("samples",) if log_samples else ())
    return {k: output[k] for k in keep if k in output}
