"""Calibration wall time on SmolLM2-135M: two gloo processes against one, on the same batches.

    python benchmarks/distributed_benchmark.py [--samples 16 --seq-len 128 --batch-size 2 --repeats 2]

Every run is a fresh process with one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)). The one-
process run and the two ranks (MASTER_ADDR=127.0.0.1, gloo) each load the model and the batches,
then time `calibrate` with the Taylor estimator's gradient terms (the two-rank time is the slower
rank's, the exchange of the statistics included). The ranks' statistics are checked bit for bit
against the one-process run's. The runs alternate (one, two, one, two, ...) so that a change in the
machine's load hits both; the table keeps every repeat and the ratio of the medians.
Results: benchmarks/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def worker(out: Path, samples: int, seq_len: int, batch_size: int) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    from adaprune.plugins import detect_spec, parse_estimator
    from adaprune.scoring import distributed
    from adaprune.scoring.calibration import calibrate
    from adaprune.tools.data import load_smollm2, token_batches, wiki_texts
    from adaprune.units.table import UnitTable

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    model, tokenizer = load_smollm2()
    batches = token_batches(tokenizer, wiki_texts("calibration"), seq_len=seq_len, num_samples=samples,
                            batch_size=batch_size)
    table = UnitTable(model, detect_spec(model))
    terms = parse_estimator("taylor").gradient_terms()
    if distributed.active():
        dist.barrier()  # start the clock together
    start = time.perf_counter()
    stats = calibrate(model, table, batches, gradient_terms=terms, progress=False)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        torch.save({"seconds": seconds, "terms": stats.gradient_terms, "tokens": stats.tokens,
                    "mean_loss": stats.mean_loss}, out)
    if distributed.active():
        times = [None] * distributed.world_size()
        dist.all_gather_object(times, seconds)
        if distributed.is_main():
            data = torch.load(out, weights_only=False)
            torch.save({**data, "seconds": max(times), "rank_seconds": times}, out)
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", str(out), "--samples", str(args.samples), "--seq-len",
           str(args.seq_len), "--batch-size", str(args.batch_size)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a {world}-process run failed")
    return torch.load(out, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", default=None)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.samples, args.seq_len, args.batch_size)
        return
    RESULTS.mkdir(exist_ok=True)
    runs: dict[int, list[float]] = {1: [], 2: []}
    exact = True
    load = []
    for repeat in range(args.repeats):
        results = {}
        for world in (1, 2):
            load.append(os.getloadavg()[0])
            results[world] = launch(world, RESULTS / f".distributed-{world}.pt", args)
            runs[world].append(round(results[world]["seconds"], 3))
            print(f"repeat {repeat}: {world} process(es): {results[world]['seconds']:.2f} s", flush=True)
        for name, per_level in results[1]["terms"].items():
            for level, tensors in per_level.items():
                exact &= all(torch.equal(a, b) for a, b in zip(tensors, results[2]["terms"][name][level]))
        exact &= results[1]["mean_loss"] == results[2]["mean_loss"]
    for world in (1, 2):
        (RESULTS / f".distributed-{world}.pt").unlink(missing_ok=True)
    ratio = statistics.median(runs[2]) / statistics.median(runs[1])
    record = {"model": "SmolLM2-135M", "estimator": "taylor", "samples": args.samples, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "threads_per_process": 1, "seconds": {str(k): v for k, v in runs.items()},
              "ratio_two_to_one": round(ratio, 3), "statistics_bit_identical": bool(exact),
              "load_average_before_runs": load, "cpus": os.cpu_count(), "torch": torch.__version__}
    from adaprune.io import write_text

    write_text(RESULTS / "distributed.json", json.dumps(record, indent=1))
    write_text(RESULTS / "distributed.md", "\n".join([
        f"Calibration (Taylor, {args.samples} x {args.seq_len} tokens, batches of {args.batch_size}) on "
        f"SmolLM2-135M, 1 thread per process, {os.cpu_count()} CPUs shared with other work.", "",
        "| processes | seconds (each repeat) | median |", "|---|---|---|",
        *[f"| {k} | {', '.join(f'{s:.2f}' for s in v)} | {statistics.median(v):.2f} |" for k, v in runs.items()],
        "", f"Two processes / one: **{ratio:.2f}x** (target <= 0.6). Statistics bit for bit equal: {exact}. "
        f"Load average (1 min) before each run: {', '.join(f'{x:.1f}' for x in load)}.", ""]))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
