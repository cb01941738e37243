"""Two real processes (gloo) against one: the statistics bit for bit, the same plan, and a dead rank fails fast."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_worker

WORKER = Path(__file__).parent / "dist_worker.py"
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, scenario: str, timeout: float = 20, world: int = 2) -> tuple[list[int], float]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "ADAPRUNE_DIST_TIMEOUT": str(timeout), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), scenario],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    codes = [p.wait(timeout=120) for p in procs]
    return codes, time.perf_counter() - start


def single(fn):
    """The reference, in this process, with one thread as each rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def identical(a, b, where="") -> None:
    """Recursive equality; tensors bit for bit (torch.equal on the same dtype)."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} differs (max |diff| {(a - b).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_two_ranks_equal_one_process(tmp_path):
    codes, _ = launch(tmp_path, "exact")
    errors = [p.read_text() for p in tmp_path.glob("*.err")]
    assert codes == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = single(dist_worker.statistics)
    for r, result in enumerate(ranks):
        # Gradient terms per unit, per position (taylor rows), per sample (Fisher), Welford activations,
        # samples/tokens/passes/mean loss: every bit the single-process pass's.
        identical(reference, result["statistics"], f"rank{r}")
    plans = single(dist_worker.plans)
    for name in ("taylor", "activation"):
        for r in range(2):
            identical(plans[name], ranks[r]["plans"][name], f"rank{r}/{name}")
    # The adaptive fusion trains data parallel (each rank its own batches, gradients averaged):
    # the blend and the plan are the same on both ranks.
    identical(ranks[0]["plans"]["adaptive"], ranks[1]["plans"]["adaptive"], "adaptive")
    assert ranks[0]["plans"]["adaptive"]["calibration"] == plans["adaptive"]["calibration"]


def test_dead_rank_fails_the_other_fast(tmp_path):
    codes, seconds = launch(tmp_path, "die", timeout=5)
    assert codes[1] == 3 and codes[0] == 1
    message = (tmp_path / "rank0.err").read_text()
    assert "adaprune.errors.DistributedError" in message
    assert "rank 1" in message.lower() or "ranks 1" in message.lower() or "1 failed" in message, message
    assert seconds < 60, f"took {seconds:.0f} s: the survivor should fail within its timeout"


@pytest.mark.parametrize("world", [1])
def test_one_rank_is_a_no_op(world):
    from adaprune.scoring import distributed

    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(["a", "b"]) == [(0, "a"), (1, "b")]
    assert distributed.combine({1: "b", 0: "a"}) == ["a", "b"]


def test_torchrun_cli_saves_on_rank_zero_the_single_process_plan(tmp_path):
    import json

    from adaprune.tools.cli import main
    from test_cli_eval_report import SHAPE, word_tokenizer

    from families import FAMILIES, build

    build(FAMILIES[0], SHAPE).save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("\n\n".join(["the cat sat on a mat . the dog ran home"] * 12))
    args = ["prune", str(tmp_path / "model"), "--calib", str(tmp_path / "text.txt"), "--samples", "6", "--seq-len",
            "8", "--batch-size", "2", "--fusion", "coarse", "--estimators", "taylor,activation", "--ratio", "0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPRUNE_DIST_TIMEOUT": "30",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "adaprune", *args,
                           "--out", str(tmp_path / "dist")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("pruned ") == 1  # only rank 0 applies, saves and says so
    assert single(lambda: main([*args, "--out", str(tmp_path / "one")])) == 0
    two, one = (json.loads((tmp_path / name / "adaprune_plan.json").read_text()) for name in ("dist", "one"))
    assert two["layers"] == one["layers"] and two["scores"] == one["scores"]
