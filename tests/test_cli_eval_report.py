"""`adaprune eval` and `adaprune report` on a tiny saved model and its plans."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adaprune import Pruner
from adaprune.tools.cli import main
from conftest import random_batches
from families import FAMILIES, Shape, build

WORDS = ["<pad>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "home", "yes", "no", "?"]
SOCIAL_IQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "social_iqa" / "task.json"
SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=24)


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny saved model with its tokenizer, a text file and a small multiple-choice task."""
    root = tmp_path_factory.mktemp("cli")
    build(FAMILIES[0], SHAPE).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    sentence = "the cat sat on a mat . the dog ran home"
    (root / "text.txt").write_text("\n\n".join([sentence] * 30))
    (root / "short.txt").write_text("the cat")
    task = {"examples": [{"input": "the cat sat on a", "target_scores": {"mat": 1, "dog": 0}},
                         {"input": "the dog ran", "target_scores": {"home": 1, "cat": 0, "mat": 0}},
                         {"input": "yes or no ?", "target_scores": {"yes": 0, "no": 1}}]}
    (root / "task.json").write_text(json.dumps(task))
    (root / "bad_task.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    return root


def test_eval_perplexity_and_multiple_choice(files, capsys):
    out = files / "results" / "eval.json"
    code = main(["eval", str(files / "model"), "--text", str(files / "text.txt"), "--seq-len", "16",
                 "--mc", str(files / "task.json"), "--limit", "2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] > 1 and result["tokens"] == result["windows"] * 15 and result["windows"] >= 10
    assert result["items"] == 2 and 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_norm"] <= 1
    assert {"accuracy_stderr", "accuracy_norm_stderr"} <= result.keys()
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "on 2 items" in printed


def test_eval_multiple_choice_against_a_reference(files, capsys):
    out = files / "results" / "compared.json"
    assert main(["eval", str(files / "model"), "--text", str(files / "text.txt"), "--seq-len", "16",
                 "--mc", str(files / "task.json"), "--reference", str(files / "model"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["agreement"] == 1 and result["accuracy_delta"] == 0 and result["reference"] == str(files / "model")
    assert "same choice on 100.0% of the items" in capsys.readouterr().out
    assert main(["eval", str(files / "model"), "--text", str(files / "text.txt"), "--seq-len", "16",
                 "--reference", str(files / "model")]) == 2
    assert "--reference compares multiple-choice answers" in capsys.readouterr().err


@pytest.mark.skipif(not SOCIAL_IQA.is_file(), reason="the shared Social IQa task is not here")
def test_eval_reads_the_big_bench_task(files):
    out = files / "siqa.json"
    assert main(["eval", str(files / "model"), "--text", str(files / "text.txt"), "--seq-len", "32",
                 "--mc", str(SOCIAL_IQA), "--limit", "3", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["items"] == 3


@pytest.mark.parametrize("arguments, message", [
    (["--text", "missing.txt"], "missing.txt does not exist"),
    (["--text", "short.txt"], "fewer than one window.*shorter --seq-len"),
    (["--text", "text.txt", "--seq-len", "1"], "--seq-len must be at least 2"),
    (["--text", "text.txt", "--limit", "0", "--mc", "task.json"], "--limit must be a positive"),
    (["--text", "text.txt", "--mc", "nothing.json"], "nothing.json does not exist.*BIG-bench"),
    (["--text", "text.txt", "--mc", "bad_task.json"], "target_scores"),
])
def test_eval_bad_input_names_the_fix(files, capsys, arguments, message):
    arguments = [str(files / a) if a.endswith((".txt", ".json")) else a for a in arguments]
    if "--seq-len" not in arguments:
        arguments += ["--seq-len", "16"]
    assert main(["eval", str(files / "model"), *arguments]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_eval_missing_model(files, capsys):
    assert main(["eval", str(files / "nowhere"), "--text", str(files / "text.txt")]) == 2
    assert "does not exist: give a checkpoint folder" in capsys.readouterr().err


def test_eval_pruned_model_with_removed_blocks_needs_remote_code(files, capsys):
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], fusion="fixed", progress=False)
    plan = pruner.plan()
    plan.layers[1].remove_attention = True
    pruner.apply(plan)
    folder = files / "pruned"
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    arguments = ["eval", str(folder), "--text", str(files / "text.txt"), "--seq-len", "16"]
    assert main(arguments) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert main(arguments + ["--trust-remote-code"]) == 0


@pytest.fixture(scope="module")
def plan_file(files):
    model = build(FAMILIES[0], SHAPE)
    pruner = Pruner(model, ratio=0.3, estimators=["taylor"], fusion="fixed", allocation="global",
                    units=["kv_groups", "channels", "blocks"], progress=False)
    plan = pruner.plan(random_batches(97))
    plan.layers[2] = type(plan.layers[2])(2, remove_mlp=True)
    path = files / "plan.json"
    plan.save(path)
    return path


def test_report_table(plan_file, capsys):
    assert main(["report", str(plan_file)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert any(line.split()[:1] == ["layer"] for line in lines)
    assert "mlp" in printed and "taylor/coarse=" in printed and "ratio 0.3, allocation global" in printed


def test_report_plot_writes_a_png(plan_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "plan.png"
    assert main(["report", str(plan_file), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "plot written" in capsys.readouterr().out


def test_report_bad_input(plan_file, tmp_path, capsys, monkeypatch):
    assert main(["report", str(tmp_path / "none.json")]) == 2
    assert "does not exist: give the plan JSON" in capsys.readouterr().err
    assert main(["report", str(plan_file), "--plot", str(tmp_path / "plot.bmpx")]) == 2
    assert "name it with one of .png" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", str(plan_file), "--plot", str(tmp_path / "plot.png")]) == 2
    assert "pip install adaprune[plot]" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_report_reads_a_checkpoint_folder(plan_file, tmp_path, capsys):
    (tmp_path / "adaprune_plan.json").write_text(plan_file.read_text())
    assert main(["report", str(tmp_path)]) == 0
    assert "layer" in capsys.readouterr().out
