"""`adaprune eval --lm-eval`: lm-eval's HF model class on a local task, offline, against adaprune's own scoring.

The local task is one of the shared BIG-bench JSON files, converted to JSONL (the same prompts the suite
scores) and declared in an lm-eval task YAML (``dataset_path: json``, ``data_files``), so that HF
``datasets`` reads it from disk with its packaged JSON builder and nothing is fetched.

Where the two differ, and why: raw accuracy agrees exactly (the same context, the continuation
``" " + choice``, the same log-likelihoods). The length-normalised one need not: lm-eval's ``acc_norm``
divides a choice's log-likelihood by ``len(choice)``, adaprune's ``accuracy_norm`` by
``len(" " + choice)`` (the characters actually scored); the test recomputes both from lm-eval's own
per-choice log-likelihoods and checks each against its source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from adaprune import Pruner
from adaprune.errors import AdapruneError
from adaprune.tools.cli import main
from adaprune.tools.evaluate import multiple_choice
from adaprune.tools.suite import default_data_dir, lm_eval_evaluate, load_task_examples
from families import FAMILIES, Shape, build

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra adaprune[eval] (make setup installs it)")

TASK = "bigbench/human_organs_senses/task.json"  # 42 items, four free-text choices each
SOURCE = default_data_dir() / TASK
pytestmark = pytest.mark.skipif(not SOURCE.is_file(), reason=f"the shared task {SOURCE} is not here")
SHAPE = Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=24)
NAME = "adaprune_local_organs"


def word_tokenizer(examples: list[dict]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that knows every word of the items (no unknown tokens, no ties)."""
    words = sorted({w for e in examples for text in [e["input"], *e["choices"]] for w in text.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """The task as JSONL and an lm-eval task YAML over it; the items as adaprune scores them; a tokenizer."""
    root = tmp_path_factory.mktemp("lm_eval")
    examples = load_task_examples(SOURCE)  # BIG-bench's prompt, as the suite builds it
    with open(root / "items.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            gold = e["scores"].index(max(e["scores"]))
            f.write(json.dumps({"query": e["input"].rstrip(), "choices": e["choices"], "gold": gold}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{NAME}.yaml").write_text(
        f"task: {NAME}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'items.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: query\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    assert max(e["scores"].count(max(e["scores"])) for e in examples) == 1  # one right answer: one gold index
    return {"root": root, "tasks": tasks, "examples": examples, "tokenizer": word_tokenizer(examples)}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    import datasets.config
    import huggingface_hub.constants

    # datasets and huggingface_hub read these when first imported (transformers already was): set them there too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_model(vocab: int):
    model = build(FAMILIES[0], Shape(**{**SHAPE.__dict__, "vocab": vocab}))
    model.config.max_position_embeddings = 512  # lm-eval truncates contexts to this; BIG-bench prompts fit
    return model


def test_lm_eval_agrees_with_multiple_choice(local_task):
    tokenizer, examples = local_task["tokenizer"], local_task["examples"]
    model = tiny_model(len(tokenizer))
    ours = multiple_choice(model, tokenizer, examples)
    theirs = lm_eval_evaluate(model, tokenizer, [NAME], include_path=local_task["tasks"], log_samples=True)
    metrics = theirs["results"][NAME]
    assert ours["items"] == len(examples) == len(theirs["samples"][NAME]) == 42
    assert metrics["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)

    # Both normalisations from lm-eval's own per-choice log-likelihoods, in item order.
    samples = sorted(theirs["samples"][NAME], key=lambda s: s["doc_id"])
    lm_norm = ours_norm = 0
    for sample, example in zip(samples, examples):
        assert sample["doc"]["choices"] == example["choices"]
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        gold = sample["doc"]["gold"]
        lm_norm += max(range(len(lls)), key=lambda i: lls[i] / len(example["choices"][i])) == gold
        ours_norm += max(range(len(lls)), key=lambda i: lls[i] / len(" " + example["choices"][i])) == gold
    assert metrics["acc_norm,none"] == pytest.approx(lm_norm / len(examples), abs=1e-12)
    assert ours["accuracy_norm"] == pytest.approx(ours_norm / len(examples), abs=1e-12)


def test_cli_lm_eval_on_a_pruned_model_with_its_own_modeling_file(local_task, tmp_path, capsys):
    """A model that lost a whole block reloads only with its generated modeling file (trust_remote_code)."""
    tokenizer = local_task["tokenizer"]
    model = tiny_model(len(tokenizer))
    pruner = Pruner(model, ratio=0.0, estimators=["magnitude"], fusion="fixed", progress=False)
    plan = pruner.plan()
    plan.layers[1].remove_attention = True
    pruner.apply(plan)
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert "auto_map" in json.loads((folder / "config.json").read_text())

    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "one", "tasks": [{"name": "organs", "path": str(SOURCE),
                                                            "metric": "accuracy_norm"}]}))
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--trust-remote-code", "--lm-eval", NAME, "--lm-eval-include",
                 str(local_task["tasks"]), "--suite", str(suite), "--limit", "20", "--batch-size", "4",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    lm = result["lm_eval"]["results"][NAME]
    ours = result["suite"]["tasks"][0]
    assert ours["items"] == 20 and result["lm_eval"]["n-samples"][NAME]["effective"] == 20
    assert lm["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
    assert f"lm-eval {NAME}: acc" in capsys.readouterr().out


def test_lm_eval_unknown_task_names_the_fix(local_task):
    tokenizer = local_task["tokenizer"]
    with pytest.raises(AdapruneError, match="lm-eval knows no task no_such_task.*--lm-eval-include"):
        lm_eval_evaluate(tiny_model(len(tokenizer)), tokenizer, ["no_such_task"], include_path=local_task["tasks"])


def test_lm_eval_hub_task_offline_names_the_fix(local_task):
    tokenizer = local_task["tokenizer"]
    with pytest.raises(AdapruneError, match="could not fetch the data.*dataset_path: json"):
        lm_eval_evaluate(tiny_model(len(tokenizer)), tokenizer, ["piqa"], limit=2)


def test_environment_is_offline():
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert Path(os.environ["HF_DATASETS_CACHE"]).name == "datasets-cache"
