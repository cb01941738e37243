"""Writes that fail half way, a full disk, and SIGINT at random points of `adaprune prune`: afterwards
the previous plan or checkpoint is intact (it reloads with the same logits) or absent, never
half-written, and no temporary sibling is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from adaprune import Plan, Pruner, ScoreCache
from adaprune.plan import PLAN_FILE
from adaprune.tools.cli import main
from conftest import random_batches
from families import FAMILIES, Shape, build
from test_cli_eval_report import word_tokenizer

SHAPE = Shape(layers=3, kv_heads=2, heads_per_group=2, head_dim=8, width=24)
IDS = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]])
SIGINT_RUNS = 2  # plus one interrupt sent while the checkpoint is being written


def logits(folder: Path) -> torch.Tensor:
    remote = "auto_map" in (folder / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings adaprune.io would leave if a write were not cleaned up."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def prune_args(root: Path, out: Path, ratio: float) -> list[str]:
    return ["prune", str(root / "model"), "--calib", str(root / "text.txt"), "--seq-len", "8", "--samples", "4",
            "--batch-size", "2", "--ratio", str(ratio), "--estimators", "taylor", "--fusion", "fixed", "--allocation",
            "uniform", "--out", str(out)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    build(FAMILIES[0], SHAPE).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text("\n\n".join(["the cat sat on a mat . the dog ran home"] * 30))
    return root


@pytest.fixture(scope="module")
def previous(root) -> tuple[Path, torch.Tensor]:
    """A good checkpoint (ratio 0.2) and its logits: what a failed rerun must leave alone."""
    out = root / "previous"
    assert main(prune_args(root, out, 0.2)) == 0
    return out, logits(out)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- a write that fails half way -----------------------------------------------------------------------
def _half_then_fail(original):
    """A writer that writes half of what it was given, then fails like a full disk."""
    def write(self, data, *args, **kwargs):
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def test_plan_save_failing_half_way_keeps_the_previous_plan(tmp_path, monkeypatch):
    model = build(FAMILIES[0], SHAPE)
    first = Pruner(model, ratio=0.2, estimators=["magnitude"], fusion="fixed", progress=False).plan()
    second = Pruner(model, ratio=0.5, estimators=["magnitude"], fusion="fixed", progress=False).plan()
    path = tmp_path / "plan.json"
    first.save(path)
    before = path.read_bytes()
    monkeypatch.setattr(Path, "write_text", _half_then_fail(Path.write_text))
    with pytest.raises(OSError, match="No space"):
        second.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and Plan.load(path).to_dict() == first.to_dict()
    assert leftovers(tmp_path) == []


def test_score_cache_save_failing_half_way_keeps_the_previous_cache(tmp_path, monkeypatch):
    model = build(FAMILIES[0], SHAPE)
    cache = Pruner(model, estimators=["taylor"], progress=False).score(random_batches(SHAPE.vocab))
    path = tmp_path / "scores.safetensors"
    cache.save(path)
    before = path.read_bytes()
    import adaprune.scoring.cache as cache_module

    original = cache_module.save_file

    def half(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", half)
    with pytest.raises(OSError):
        cache.save(path)
    assert path.read_bytes() == before and len(ScoreCache.load(path)) == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fails", ["tokenizer", "model", "plan"])
def test_prune_rerun_failing_half_way_keeps_the_previous_checkpoint(root, previous, monkeypatch, capsys, fails):
    out, expected = previous
    before = _snapshot(out)
    if fails == "tokenizer":
        original = PreTrainedTokenizerBase.save_pretrained

        def broken(self, folder, *args, **kwargs):
            original(self, folder, *args, **kwargs)
            Path(folder, "tokenizer.json").write_text("{")  # the half-written file a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    elif fails == "model":
        original = PreTrainedModel.save_pretrained

        def broken(self, folder, *args, **kwargs):
            Path(folder, "config.json").write_text(json.dumps({"half": True}))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    else:
        monkeypatch.setattr(Path, "write_text", _half_then_fail(Path.write_text))
    code = main([*prune_args(root, out, 0.5), "--overwrite"])
    monkeypatch.undo()
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert torch.allclose(logits(out), expected)
    assert leftovers(out.parent) == []


def test_report_plot_failing_half_way_keeps_the_previous_plot(previous, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    out, _ = previous
    plot = tmp_path / "plan.png"
    assert main(["report", str(out), "--plot", str(plot)]) == 0
    before = plot.read_bytes()
    original = Figure.savefig

    def broken(self, fname, *args, **kwargs):
        original(self, fname, *args, **kwargs)
        Path(fname).write_bytes(Path(fname).read_bytes()[:50])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    assert main(["report", str(out), "--plot", str(plot)]) == 2
    assert plot.read_bytes() == before and leftovers(tmp_path) == []


# ---- a small full filesystem -------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be made."""
    folder = tmp_path / "disk"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of `folder` until about `leave` bytes are free."""
    (folder / "filler").unlink(missing_ok=True)
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_full_disk_keeps_the_previous_checkpoint_and_plan(root, previous, small_disk, capsys):
    out = small_disk / "pruned"
    assert main(prune_args(root, out, 0.2)) == 0
    expected = logits(out)
    before = _snapshot(out)
    plan = Plan.load(out / PLAN_FILE)
    plan_copy = small_disk / "plan.json"
    plan.save(plan_copy)
    plan_bytes = plan_copy.read_bytes()
    _fill(small_disk, leave=16 * 1024)  # room for neither a checkpoint nor, below, a second plan
    code = main([*prune_args(root, out, 0.5), "--overwrite"])
    assert code == 2 and "No space left on device" in capsys.readouterr().err
    assert _snapshot(out) == before and torch.allclose(logits(out), expected)
    _fill(small_disk, leave=0)
    bigger = Plan.from_dict(plan.to_dict())
    bigger.fusion["warnings"] = ["x" * 50_000]
    with pytest.raises(OSError):
        bigger.save(plan_copy)
    assert plan_copy.read_bytes() == plan_bytes
    assert leftovers(small_disk) == [] and leftovers(out) == []


# ---- SIGINT at random points ---------------------------------------------------------------------------
def test_sigint_at_random_points_leaves_old_or_new_never_half(root, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "adaprune"]
    reference = tmp_path / "reference"
    start = time.perf_counter()
    subprocess.run([*command, *prune_args(root, reference, 0.5)], env=env, check=True, capture_output=True)
    duration = time.perf_counter() - start
    new = logits(reference)
    out = tmp_path / "out"
    assert main(prune_args(root, out, 0.2)) == 0  # in this process: only the interrupted runs need their own
    old = logits(out)
    generator = random.Random(10)
    seen = []
    for _ in range(SIGINT_RUNS):
        delay = generator.uniform(0.3 * duration, 1.05 * duration)
        process = subprocess.Popen([*command, *prune_args(root, out, 0.5), "--overwrite"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        text = err.decode()
        # An interrupt while Python is still importing (before adaprune's handler exists) ends in
        # Python's own KeyboardInterrupt traceback; any other traceback is a failure.
        assert "Traceback" not in text or text.rstrip().endswith("KeyboardInterrupt"), text
        assert process.returncode in (0, 1, 130, -signal.SIGINT), (process.returncode, text)
        assert out.is_dir() and leftovers(tmp_path) == [], leftovers(tmp_path)
        now = logits(out)  # whole: it reloads; and it is one of the two, not a mix
        state = "new" if torch.allclose(now, new, atol=1e-5) else "old" if torch.allclose(now, old, atol=1e-5) else "?"
        assert state != "?", "the checkpoint is neither the old nor the new one"
        seen.append((round(delay, 2), process.returncode, state))
        if state == "new":  # put the old one back, so that the next interrupt can show a mix
            assert main([*prune_args(root, out, 0.2), "--overwrite"]) == 0
    print("SIGINT runs (delay s, exit status, checkpoint):", seen)


# ---- the demo's folder appears only once it reloads --------------------------------------------------
@pytest.fixture
def tiny_demo(monkeypatch, root):
    """`adaprune demo` on the tiny model and text (the real one takes minutes)."""
    from adaprune.tools import demo

    sentence = "the cat sat on a mat . the dog ran home"
    monkeypatch.setattr(demo, "load_smollm2", lambda: (AutoModelForCausalLM.from_pretrained(root / "model").eval(),
                                                       word_tokenizer()))
    monkeypatch.setattr(demo, "wiki_texts", lambda split: [sentence] * 30)
    monkeypatch.setattr(demo, "test_token_stream", lambda tokenizer: torch.tensor(
        word_tokenizer()(" ".join([sentence] * 10))["input_ids"]))
    monkeypatch.setattr(demo, "SEQ_LEN", 8)
    monkeypatch.setattr(demo, "CALIBRATION_SAMPLES", 4)
    monkeypatch.setattr(demo, "RECONSTRUCTION_SAMPLES", 8)
    monkeypatch.setattr(demo, "EVAL_WINDOWS", 2)
    monkeypatch.setattr(demo, "SPEEDS", {})
    return demo


def test_demo_output_appears_whole_and_replaces_its_own(tiny_demo, tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert tiny_demo.run_demo(out=str(out)) == 0
    assert (out / PLAN_FILE).is_file() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    assert tiny_demo.check_demo_output(out) == out  # a rerun may replace the demo's own earlier output


def test_demo_whose_reload_fails_writes_nothing(tiny_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny_demo, "RELOAD_CHECK", "raise SystemExit('the reload failed')")
    out = tmp_path / "demo-out"
    assert tiny_demo.run_demo(out=str(out)) == 1
    assert not out.exists() and leftovers(tmp_path) == []
    assert "was not written" in capsys.readouterr().err


# Runs `adaprune prune` with the tokenizer's save slowed down and announced by a marker file, so that
# an interrupt can be sent while the checkpoint folder is half-written (the model is saved, the
# tokenizer not yet): test scaffolding around the real command, nothing in adaprune changes.
MID_SAVE = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even if started where SIGINT is ignored
from transformers import PreTrainedTokenizerBase
original = PreTrainedTokenizerBase.save_pretrained
def slow(self, folder, *args, **kwargs):
    Path(sys.argv[1]).write_text("saving")
    time.sleep(30)
    return original(self, folder, *args, **kwargs)
PreTrainedTokenizerBase.save_pretrained = slow
from adaprune.tools.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigint_while_the_checkpoint_is_half_written(root, previous, tmp_path):
    out, expected = previous
    before = _snapshot(out)
    marker = tmp_path / "saving"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-c", MID_SAVE, str(marker), *prune_args(root, out, 0.5),
                                "--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()[1].decode()
    halfway = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    assert halfway and (halfway[0] / "model.safetensors").is_file()  # the new folder is half-written now
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    lines = [line for line in err.decode().splitlines() if line.startswith("adaprune: ")]
    assert len(lines) == 1 and lines[0].startswith("adaprune: interrupted") and "Traceback" not in err.decode()
    assert _snapshot(out) == before and torch.allclose(logits(out), expected)
    assert leftovers(out.parent) == []
