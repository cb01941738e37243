"""Zero-shot suites: loading, data folder resolution, prompts, chance levels, evaluation, `adaprune eval --suite`."""

from __future__ import annotations

import json
import math
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adaprune.errors import AdapruneError
from adaprune.tools import suite as suite_module
from adaprune.tools.cli import main
from adaprune.tools.evaluate import multiple_choice
from adaprune.tools.suite import (DATA_ENV, available_suites, chance_level, choose_metric, constant_baseline,
                                  default_data_dir, evaluate_suite, format_suite_table, load_suite,
                                  load_task_examples, suite_loglikelihoods)
from families import FAMILIES, Shape, build

WORDS = ["<pad>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "home", "yes", "no", "?",
         "big", "red", "Q:", "A:", "choice:", "is", "it"]
SHAPE = Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=24)


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


LABELS = {"task_prefix": "is it ? ", "append_choices_to_input": False, "examples": [
    {"input": "the cat sat on a mat", "target_scores": {"yes": 1, "no": 0}},
    {"input": "the dog sat on a cat", "target_scores": {"yes": 0, "no": 1}},
    {"input": "the dog ran home", "target_scores": {"yes": 1, "no": 0}},
    {"input": "a cat ran", "target_scores": {"yes": 1, "no": 0}},
]}
FREE = {"examples": [
    {"input": "the cat sat on", "target_scores": {"a mat": 1, "the dog": 0, "home": 0}},
    {"input": "the dog ran", "target_scores": {"home": 1, "on a big red mat": 0}},
    {"input": "the big red", "target_scores": {"cat": 1, "dog": 1, "mat": 0, "home": 0}},  # two right answers
]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data folder with two tiny tasks, a suite over them, and a saved tiny model."""
    root = tmp_path_factory.mktemp("suite")
    for name, task in (("labels", LABELS), ("free", FREE)):
        (root / "data" / name).mkdir(parents=True)
        (root / "data" / name / "task.json").write_text(json.dumps(task))
    suite = {"name": "tiny", "tasks": [
        {"name": "labels", "path": "labels/task.json", "metric": "accuracy", "limit": 3},
        {"name": "free", "path": "free/task.json", "metric": "accuracy_norm"},
    ]}
    (root / "tiny.json").write_text(json.dumps(suite))
    torch_model = build(FAMILIES[0], SHAPE)
    torch_model.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    return root


def test_builtin_suite_loads_by_name_and_names_its_tasks():
    # benchmarks/suite_selection.py kept two tasks (benchmarks/results/suite_selection.md).
    assert {"candidates", "zero_shot"} <= set(available_suites())
    chosen = load_suite("zero_shot")
    assert [t.name for t in chosen.tasks] == ["social_iqa", "date_understanding"]
    assert all(t.prompt == "plain" and t.chance is not None and t.limit for t in chosen.tasks)
    suite = load_suite("candidates")
    assert suite.name == "candidates" and len(suite.tasks) == 21
    for task in suite.tasks:
        assert task.metric in ("accuracy", "accuracy_norm") and task.path.endswith("task.json")
        assert task.limit and task.limit >= 1 and 0 < task.chance < 1


def test_suite_loads_from_a_path(data):
    suite = load_suite(data / "tiny.json")
    assert [t.name for t in suite.tasks] == ["labels", "free"]
    assert suite.tasks[0].limit == 3 and suite.tasks[1].limit is None and suite.tasks[1].prompt == "bigbench"


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    (json.dumps({"tasks": []}), "non-empty 'tasks'"),
    (json.dumps({"tasks": [{"name": "x"}]}), "needs a 'path'"),
    (json.dumps({"tasks": [{"path": "a.json", "metric": "f1"}]}), "metric must be"),
    (json.dumps({"tasks": [{"path": "a.json", "limit": 0}]}), "limit must be a positive"),
    (json.dumps({"tasks": [{"path": "a.json", "weight": 2}]}), "unknown keys"),
    (json.dumps({"tasks": [{"path": "x/a.json"}, {"path": "x/b.json"}]}), "names must be unique"),
])
def test_malformed_suite_names_the_problem(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(AdapruneError, match=message):
        load_suite(tmp_path / "bad.json")


def test_unknown_suite_lists_the_builtin_ones():
    with pytest.raises(AdapruneError, match="neither a suite file nor a built-in suite.*candidates"):
        load_suite("no_such_suite")


def test_missing_task_names_the_data_folder_fix(data, tmp_path, monkeypatch):
    model, tokenizer = build(FAMILIES[0], SHAPE), word_tokenizer()
    with pytest.raises(AdapruneError, match=f"labels/task.json does not exist.*{DATA_ENV}"):
        evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=tmp_path)
    monkeypatch.setenv(DATA_ENV, str(data / "data"))  # the environment variable is the default's override
    assert default_data_dir() == data / "data"
    assert evaluate_suite(model, tokenizer, data / "tiny.json")["tasks"][0]["items"] == 3


def test_default_data_folder_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    checkout = suite_module.Path(suite_module.__file__).resolve().parents[2]
    assert default_data_dir() == checkout.parent / "shared" / "data"


def test_bigbench_prompt_uses_the_task_prefixes(data):
    labels = load_task_examples(data / "data" / "labels" / "task.json")
    assert labels[0]["input"] == "is it ? \nQ: the cat sat on a mat\nA: "
    free = load_task_examples(data / "data" / "free" / "task.json")
    # BIG-bench's defaults: choices appended (sorted), "\nQ: " before and "\nA: " after.
    assert free[1]["input"] == "Q: the dog ran\n  choice: home\n  choice: on a big red mat\nA: "
    plain = load_task_examples(data / "data" / "free" / "task.json", prompt="plain", limit=2)
    assert [e["input"] for e in plain] == ["the cat sat on", "the dog ran"]


def test_chance_baseline_and_metric_rule():
    labels = load_task_examples_from(LABELS)
    free = load_task_examples_from(FREE)
    assert chance_level(labels) == 0.5
    assert constant_baseline(labels) == 0.75  # always "yes" is right on 3 of 4
    assert chance_level(free) == pytest.approx((1 / 3 + 1 / 2 + 2 / 4) / 3)
    assert constant_baseline(free) == chance_level(free)  # no fixed label to repeat
    assert choose_metric(labels) == "accuracy" and choose_metric(free) == "accuracy_norm"


def load_task_examples_from(task: dict) -> list[dict]:
    return [{"input": e["input"], "choices": list(e["target_scores"]), "scores": list(e["target_scores"].values())}
            for e in task["examples"]]


def test_evaluate_suite_matches_multiple_choice_and_averages(data):
    model, tokenizer = build(FAMILIES[0], SHAPE), word_tokenizer()
    result = evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data")
    labels, free = result["tasks"]
    expected_labels = multiple_choice(model, tokenizer, load_task_examples(data / "data/labels/task.json", limit=3))
    expected_free = multiple_choice(model, tokenizer, load_task_examples(data / "data/free/task.json"))
    for row, expected in ((labels, expected_labels), (free, expected_free)):
        for key in ("accuracy", "accuracy_stderr", "accuracy_norm", "accuracy_norm_stderr", "items"):
            assert row[key] == expected[key]
    assert labels["items"] == 3 and free["items"] == 3
    assert labels["score"] == labels["accuracy"] and free["score"] == free["accuracy_norm"]
    assert labels["chance"] == 0.5 and free["chance"] == pytest.approx(chance_level(load_task_examples_from(FREE)))
    assert result["average"] == pytest.approx((labels["accuracy"] + free["accuracy_norm"]) / 2)
    assert result["average_accuracy"] == pytest.approx((labels["accuracy"] + free["accuracy"]) / 2)
    assert result["average_accuracy_norm"] == pytest.approx((labels["accuracy_norm"] + free["accuracy_norm"]) / 2)
    assert result["average_stderr"] == pytest.approx(
        math.sqrt(labels["accuracy_stderr"] ** 2 + free["accuracy_norm_stderr"] ** 2) / 2)
    assert evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data", limit=1)["tasks"][1]["items"] == 1
    table = format_suite_table(result)
    assert "labels" in table and "free" in table and "average" in table


def test_evaluate_suite_against_a_reference_model(data):
    model, tokenizer = build(FAMILIES[0], SHAPE), word_tokenizer()
    result = evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data", reference=model)
    assert result["average_delta"] == 0 and result["average_delta_stderr"] == 0 and result["average_agreement"] == 1
    assert result["reference_average"] == pytest.approx(result["average"])
    other = build(FAMILIES[0], SHAPE, seed=1)
    compared = evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data", reference=other)
    for row in compared["tasks"]:
        alone = multiple_choice(model, tokenizer, load_task_examples(data / "data" / row["path"], limit=row["items"]),
                                reference=other)
        assert row["score_delta"] == alone[f"{row['metric']}_delta"] and row["choice_kl"] == alone["choice_kl"]
        assert row["reference_score"] == pytest.approx(row["score"] - row["score_delta"])
    assert "paired" in format_suite_table(compared) and "paired" not in format_suite_table(
        evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data"))


def test_evaluate_suite_against_cached_reference_scores(data):
    """The dense model's suite_loglikelihoods, scored once, give what the dense model itself gives."""
    model, other, tokenizer = build(FAMILIES[0], SHAPE), build(FAMILIES[0], SHAPE, seed=1), word_tokenizer()
    cached = suite_loglikelihoods(other, tokenizer, data / "tiny.json", data_dir=data / "data", limit=2)
    assert sorted(cached) == ["free", "labels"] and all(len(scores) == 2 for scores in cached.values())
    direct, from_cache = (evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data", limit=2,
                                         reference=reference) for reference in (other, cached))
    for result in (direct, from_cache):
        for row in result["tasks"]:
            del row["seconds"]  # the only thing that may differ
    assert from_cache == direct and "average_delta" in direct
    with pytest.raises(AdapruneError, match="no task free .*suite_loglikelihoods"):
        evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data", limit=2,
                       reference={"labels": cached["labels"]})
    with pytest.raises(ValueError, match="reference scores do not match the items"):  # scored on other items
        evaluate_suite(model, tokenizer, data / "tiny.json", data_dir=data / "data", reference=cached)


def test_cli_suite_against_the_dense_model(data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(data / "model"), "--suite", str(data / "tiny.json"), "--data-dir", str(data / "data"),
                 "--reference", str(data / "model"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["reference"] == str(data / "model") and result["suite"]["average_agreement"] == 1
    assert "difference +0.0000 ± 0.0000 (paired)" in capsys.readouterr().out


def test_cli_suite_writes_each_task_and_the_average(data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(data / "model"), "--suite", str(data / "tiny.json"), "--data-dir", str(data / "data"),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [t["name"] for t in result["suite"]["tasks"]] == ["labels", "free"]
    assert 0 <= result["suite"]["average"] <= 1 and "perplexity" not in result
    printed = capsys.readouterr().out
    assert re.search(r"average of each task's metric 0\.\d{4}", printed) and "written to" in printed


@pytest.mark.parametrize("arguments, message", [
    ([], "nothing to evaluate: give --text FILE.*--suite"),
    (["--suite", "no_such_suite"], "neither a suite file nor a built-in suite.*candidates"),
    (["--suite", "tiny.json", "--data-dir", "nowhere"], "does not exist; point the data folder"),
    (["--mc", "task.json"], "give --text FILE too"),
    (["--suite", "tiny.json", "--data-dir", "data", "--reference", "nowhere"], "--reference .*nowhere does not exist"),
])
def test_cli_suite_bad_input_names_the_fix(data, capsys, arguments, message):
    arguments = [str(data / a) if a in ("tiny.json", "nowhere", "data") else a for a in arguments]
    assert main(["eval", str(data / "model"), *arguments]) == 2
    assert re.search(message, capsys.readouterr().err)


SELECTION = suite_module.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "suite_selection.json"


@pytest.mark.slow
@pytest.mark.skipif(not (default_data_dir() / "bigbench").is_dir() or not SELECTION.is_file(),
                    reason="needs the shared BIG-bench tasks and the selection results")
def test_dense_smollm2_reproduces_the_selection_table():
    """The suite's smallest task on the real model gives the numbers the selection recorded."""
    from adaprune.tools.data import load_smollm2

    rows = {r["name"]: r for r in json.loads(SELECTION.read_text())["tasks"]}
    suite = load_suite("candidates")
    task = min((t for t in suite.tasks if t.limit >= 10), key=lambda t: t.limit)
    model, tokenizer = load_smollm2()
    one = suite_module.Suite(name="one", tasks=(task,))
    row = evaluate_suite(model, tokenizer, one)["tasks"][0]
    recorded = rows[task.name]
    assert row["items"] == recorded["items"] == task.limit
    assert row["accuracy"] == recorded[task.prompt]["accuracy"]
    assert row["accuracy_norm"] == recorded[task.prompt]["accuracy_norm"]
    assert row["chance"] == pytest.approx(task.chance, abs=1e-6)
