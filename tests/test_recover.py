"""LoRA recovery (adaprune.recover and `adaprune recover`) on tiny models of every family."""

from __future__ import annotations

import copy
import re
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaprune import Pruner, RecoveryError, RecoveryReport, recover
from adaprune.stages.recover import lora_targets, teacher_samples
from adaprune.tools.cli import main
from conftest import random_batches
from families import FAMILIES, Shape, build, prune_by_hand
from test_cli_eval_report import word_tokenizer

SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=4, width=16)
IDS = torch.tensor([[5, 17, 3, 42, 8, 1, 64, 23, 11]])


def llama(shape: Shape = SHAPE):
    return build(FAMILIES[0], shape)




def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_the_loss_goes_down_on_a_fixed_batch():
    model = llama()
    batch = random_batches(SHAPE.vocab, count=1, batch=4, seq=16)
    report = RecoveryReport()
    recover(model, batch, steps=40, lr=1e-2, objective="lm", progress=False, report=report)
    assert report.steps == 40 and len(report.losses) == 40 and report.tokens == 40 * 4 * 16
    assert sum(report.losses[-5:]) / 5 < 0.9 * sum(report.losses[:5]) / 5
    # The merged model computes what the last steps trained: its loss on the batch is that low too.
    with torch.no_grad():
        out = model(input_ids=batch[0], labels=batch[0]).loss.item()
    assert out < report.losses[0] * 0.9


def test_after_recovery_no_adapter_same_shapes_and_only_targets_changed(family):
    model = build(family, SHAPE)
    before = state(model)
    config, cls = model.config.to_dict(), type(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    targets = lora_targets(model)
    report = RecoveryReport()
    recover(model, random_batches(SHAPE.vocab), steps=3, lr=1e-2, progress=False, report=report)
    assert report.targets == targets and report.trainable_parameters > 0
    assert type(model) is cls and model.config.to_dict() == config and not model.training
    assert not any("lora" in name or "peft" in type(m).__module__ for name, m in model.named_modules())
    assert not hasattr(model, "peft_config")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[name].shape == before[name].shape for name in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    # LoRA adds B A to each target's weight (its bias untouched); everything else is bit for bit the same.
    assert changed == {f"{t}.weight" for t in targets}


def test_dtype_follows_the_model():
    model = llama().to(torch.bfloat16)
    recover(model, random_batches(SHAPE.vocab), steps=2, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_removed_blocks_get_no_adapter():
    model = prune_by_hand(llama(), remove_mlp=[False, True, False], remove_attention=[True, False, False])
    targets = lora_targets(model)
    assert not any(t.startswith("model.layers.1.mlp") or t.startswith("model.layers.0.self_attn") for t in targets)
    assert len(targets) == 3 * 7 - 3 - 4
    recover(model, random_batches(SHAPE.vocab), steps=2, progress=False)


def test_per_layer_shapes_recovered_then_saved_reload_exactly(tmp_path):
    model = prune_by_hand(llama(), remove_kv_groups=[[0], [], [1]], remove_channels=[[1, 2, 3], [0], []],
                     remove_mlp=[False, False, True])
    recover(model, random_batches(SHAPE.vocab), steps=5, lr=1e-2, progress=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" in config and config["per_layer_config"]
    assert not list(tmp_path.glob("adapter_*"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_kl_to_the_teacher_goes_down():
    teacher = llama()
    student = prune_by_hand(copy.deepcopy(teacher), remove_channels=[list(range(10))] * 3, remove_kv_groups=[[0]] * 3)
    report = RecoveryReport()
    batches = random_batches(SHAPE.vocab, count=2, batch=4)
    # Random tokens carry nothing to generalise from: the training batches serve as validation.
    recover(student, batches, teacher=teacher, steps=30, lr=3e-3, validation=batches, eval_every=10,
            progress=False, report=report)
    assert report.settings["objective"] == "kl"
    assert [step for step, _ in report.validation] == [0, 10, 20, 30]
    assert report.validation[-1][1] < report.validation[0][1]


def test_kl_to_itself_starts_at_zero():
    model = llama()
    report = RecoveryReport()
    recover(model, random_batches(SHAPE.vocab), teacher=copy.deepcopy(model), steps=1, progress=False, report=report)
    assert report.losses[0] == pytest.approx(0, abs=1e-6)


def test_generated_windows_are_sampled_from_the_teacher_and_join_the_text():
    teacher = llama()
    teacher.config.bos_token_id = 7
    student = prune_by_hand(copy.deepcopy(teacher), remove_channels=[list(range(10))] * 3, remove_kv_groups=[[0]] * 3)
    text = random_batches(SHAPE.vocab, count=2, batch=4, seq=10)
    report = RecoveryReport()
    recover(student, text, teacher=teacher, generated=6, steps=2, progress=False, report=report)
    assert report.settings["generated"] == 6 and report.settings["training_rows"] == 8 + 6
    samples = teacher_samples(teacher, 6, seq_len=10, batch_size=4, seed=3)
    assert [tuple(b.shape) for b in samples] == [(4, 10), (2, 10)]
    rows = torch.cat(samples)
    assert (rows[:, 0] == 7).all() and len({tuple(r.tolist()) for r in rows}) > 1  # sampled, not greedy
    assert torch.equal(rows, torch.cat(teacher_samples(teacher, 6, seq_len=10, batch_size=4, seed=3)))
    assert not torch.equal(rows, torch.cat(teacher_samples(teacher, 6, seq_len=10, batch_size=4, seed=4)))


def test_distillation_samples_half_as_many_windows_as_the_text_by_default():
    teacher = llama()
    student = prune_by_hand(copy.deepcopy(teacher), remove_channels=[list(range(10))] * 3, remove_kv_groups=[[0]] * 3)
    text = random_batches(SHAPE.vocab, count=2, batch=4, seq=10)
    runs = {}
    for label, bos, kwargs in (("kl", 7, {"teacher": teacher}), ("no start token", None, {"teacher": teacher}),
                               ("lm", 7, {})):
        teacher.config.bos_token_id, teacher.config.eos_token_id = bos, None
        report = RecoveryReport()
        recover(copy.deepcopy(student), text, steps=1, progress=False, report=report, **kwargs)
        runs[label] = (report.settings["generated"], report.settings["training_rows"])
    assert runs == {"kl": (4, 8 + 4), "no start token": (0, 8), "lm": (0, 8)}


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "kl"}, "pass teacher="),
    ({"objective": "lm", "teacher": "dense"}, "only used by objective='kl'"),
    ({"objective": "mse"}, "Unknown objective"),
    ({"steps": 0}, "steps must be a positive"),
    ({"lr": -1.0}, "lr and alpha must be positive"),
    ({"blocks": ["embeddings"]}, "Unknown block kind"),
    ({"generated": 4}, "generated= samples text from the teacher"),
    ({"generated": -1, "teacher": "dense"}, "generated must be a non-negative integer"),
])
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    model = llama()
    if kwargs.get("teacher") == "dense":
        kwargs["teacher"] = llama()
    before = state(model)
    with pytest.raises(RecoveryError, match=message):
        recover(model, random_batches(SHAPE.vocab), progress=False, **kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_texts_need_a_tokenizer_and_are_cut_into_windows():
    model = build(FAMILIES[0], Shape(layers=1, kv_heads=1, heads_per_group=2, head_dim=4, width=8, vocab=14))
    texts = ["the cat sat on a mat", "the dog ran home"] * 20
    with pytest.raises(Exception, match="pass tokenizer="):
        recover(model, texts, steps=1, progress=False)
    report = RecoveryReport()
    recover(model, texts, tokenizer=word_tokenizer(), seq_len=8, batch_size=2, steps=3, progress=False,
            report=report)
    assert report.tokens == 3 * 2 * 8


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interruption_mid_training_leaves_the_model_bit_identical(error):
    model = prune_by_hand(llama(), remove_kv_groups=[[0], [], [1]], remove_channels=[[1, 2], [], [0]])
    before, out = state(model), logits(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    calls = []

    def fail_on_the_fifth_forward(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise error("interrupted")

    hook = model.lm_head.register_forward_pre_hook(fail_on_the_fifth_forward)
    with pytest.raises(error):
        recover(model, random_batches(SHAPE.vocab), steps=10, lr=1e-2, progress=False)
    hook.remove()
    assert len(calls) == 5
    assert not any("lora" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert torch.equal(logits(model), out)


def test_the_global_rng_is_left_alone_and_the_seed_repeats():
    torch.manual_seed(123)
    expected = torch.rand(3)
    first, second = llama(), llama()
    torch.manual_seed(123)
    recover(first, random_batches(SHAPE.vocab), steps=3, lr=1e-2, progress=False)
    assert torch.equal(torch.rand(3), expected)
    recover(second, random_batches(SHAPE.vocab), steps=3, lr=1e-2, progress=False)
    assert torch.equal(logits(first), logits(second))


# ---- command line -------------------------------------------------------------------------------

@pytest.fixture
def checkpoints(tmp_path):
    """A dense tiny checkpoint, its pruned (per-layer shapes) checkpoint with a plan, and a text file."""
    shape = Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=4, width=16, vocab=14)
    dense = build(FAMILIES[0], shape)
    dense.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    pruned = copy.deepcopy(dense)
    pruner = Pruner(pruned, ratio=0.0, estimators=["magnitude"], progress=False)
    plan = pruner.plan()
    plan.layers[0].remove_kv_groups, plan.layers[1].remove_channels = [1], [0, 1, 2]
    pruner.apply(plan, mode="slice")
    pruned.save_pretrained(tmp_path / "pruned")
    word_tokenizer().save_pretrained(tmp_path / "pruned")
    plan.save(tmp_path / "pruned" / "adaprune_plan.json")
    (tmp_path / "text.txt").write_text("\n\n".join(["the cat sat on a mat . the dog ran home"] * 40))
    return tmp_path


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_recover_round_trip(checkpoints, capsys):
    root = checkpoints
    out = root / "recovered"
    files_before = folder_bytes(root / "pruned")
    code = main(["recover", str(root / "pruned"), "--text", str(root / "text.txt"), "--out", str(out),
                 "--teacher", str(root / "dense"), "--steps", "4", "--samples", "8", "--seq-len", "8",
                 "--batch-size", "2", "--lr", "0.01", "--generated", "4", "--trust-remote-code",
                 "--report", str(root / "rec.json")])
    assert code == 0, capsys.readouterr().err
    assert "recovered with kl for 4 steps" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "adaprune_plan.json",
            "adaprune_recovery.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "adaprune_recovery.json").read_text())
    assert record["steps"] == 4 and len(record["losses"]) == 4 and record["tokens"] == 4 * 2 * 8
    assert record["settings"]["generated"] == 4 and record["settings"]["training_rows"] == 8 + 4
    assert json.loads((root / "rec.json").read_text()) == record
    pruned = AutoModelForCausalLM.from_pretrained(root / "pruned", trust_remote_code=True).eval()
    recovered = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert [p.shape for p in recovered.parameters()] == [p.shape for p in pruned.parameters()]
    words = torch.tensor([[2, 3, 4, 5, 6, 7, 2, 8]])
    assert not torch.equal(logits(recovered, words), logits(pruned, words))
    assert folder_bytes(root / "pruned") == files_before  # the input is untouched
    # lm objective, no teacher, into the same folder with --overwrite.
    assert main(["recover", str(root / "pruned"), "--text", str(root / "text.txt"), "--out", str(out),
                 "--steps", "2", "--samples", "4", "--seq-len", "8", "--trust-remote-code", "--overwrite"]) == 0
    assert json.loads((out / "adaprune_recovery.json").read_text())["settings"]["objective"] == "lm"


@pytest.mark.parametrize("arguments, message", [
    (["--out", "{root}/pruned"], "is the input checkpoint"),
    (["--out", "{root}/dense"], "exists and is not empty; pass --overwrite"),
    (["--out", "{root}/new", "--objective", "kl"], "pass --teacher DENSE"),
    (["--out", "{root}/new", "--generated", "8"], "--generated samples text from the dense model"),
    (["--out", "{root}/new", "--steps", "0"], "--steps must be a positive"),
    (["--out", "{root}/new", "--samples", "1000"], "not enough text.*fewer --samples"),
    (["--out", "{root}/new", "--text", "{root}/missing.txt"], "missing.txt does not exist"),
])
def test_cli_recover_bad_input_names_the_fix(checkpoints, capsys, arguments, message):
    root = checkpoints
    arguments = [a.format(root=root) for a in arguments]
    if "--text" not in arguments:
        arguments += ["--text", str(root / "text.txt")]
    code = main(["recover", str(root / "pruned"), "--seq-len", "8", "--trust-remote-code", *arguments])
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(f"^adaprune: error: .*{message}", err, re.MULTILINE), err
    assert not (root / "new").exists()


def test_cli_recover_refuses_remote_code_without_the_flag(checkpoints, capsys):
    root = checkpoints
    assert main(["recover", str(root / "pruned"), "--text", str(root / "text.txt"), "--out", str(root / "new"),
                 "--seq-len", "8"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


# ---- as a stage of the Pruner -------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["kl", "lm"])
def test_the_recover_stage_keeps_removed_units_removed(objective):
    from adaprune.apply.positions import pruned_positions
    from adaprune.stages.recover import RecoverStage

    batches = random_batches(SHAPE.vocab, count=2, batch=4)
    results = {}
    for mode in ("mask", "slice"):
        model = llama()
        dense = state(model)
        stage = RecoverStage(objective=objective, steps=6, lr=1e-2)
        pruner = Pruner(model, ratio=0.4, estimators=["magnitude"], allocation="global",
                        units=["kv_groups", "channels", "blocks"], reconstruct=False, stages=[stage], progress=False)
        plan = pruner.plan(batches)
        pruner.apply(plan, mode=mode)
        record = plan.stages["recover"]
        assert record["steps"] == 6 and record["settings"]["objective"] == objective
        results[mode] = logits(model)
        if mode == "mask":
            # Every position the plan removed is still zero, and the kept ones were trained.
            for _, linear, axis, kept in pruned_positions(plan, pruner_units(model), model):
                weight = linear.weight if axis == "out" else linear.weight.T
                dropped = torch.ones(weight.shape[0], dtype=torch.bool)
                dropped[kept] = False
                assert torch.count_nonzero(weight[dropped]) == 0
            assert not any("lora" in name for name, _ in model.named_modules())
            pruner.restore()
            assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())
    # The sliced model computes what the masked one trained.
    torch.testing.assert_close(results["slice"], results["mask"], rtol=1e-4, atol=1e-5)


def pruner_units(model):
    from adaprune import unit_table

    return unit_table(model)


def test_plain_recover_refuses_a_masked_model():
    model = llama()
    pruner = Pruner(model, ratio=0.3, estimators=["magnitude"], reconstruct=False, progress=False)
    pruner.apply(pruner.plan(random_batches(SHAPE.vocab)), mode="mask")
    with pytest.raises(RecoveryError, match="RecoverStage"):
        recover(model, random_batches(SHAPE.vocab), steps=1, progress=False)
