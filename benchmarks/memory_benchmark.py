"""Peak memory of calibration on SmolLM2-135M, as a multiple of the float32 model's size.

    python benchmarks/memory_benchmark.py            # every case, each in a fresh process
    python benchmarks/memory_benchmark.py --quick    # 10 samples only

Every case runs with 10 samples; the references and Taylor also with 64, to show
that the statistics do not grow with the calibration set (the other estimators keep the same
per-unit or per-channel statistics, so 64 samples would only take longer).

Each case runs in its own subprocess, so that one case's allocations never count towards
another's. The child loads the model and the calibration samples (128 tokens each, one sample per
pass), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux) so that the peak
excludes loading, runs the case, and reports the process's peak resident set size (VmHWM; where
the reset is not allowed, the peak includes loading, and the results say so) divided by the
model's float32 size.

Cases: two references, ``forward-only`` (inference over the same samples, no gradients: the floor
any calibration stands on) and ``plain-backward`` (a full backward per sample that keeps every
gradient, as a naive Taylor implementation would), and each estimator through `Pruner.score`.
Three ratios are reported: the whole process (Python, torch and transformers included: about 0.6
of this model before it is loaded), the part above that runtime (the model, one pass's
activations, the statistics), and what the case adds to the loaded model (the peak minus the
resident memory once the weights, tokenizer and samples are in).
Results go to benchmarks/results/memory.json and memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SEQ_LEN = 128
CASES = {  # name -> estimators given to Pruner (None: a reference case of `REFERENCES`)
    "forward-only": None,
    "plain-backward": None,
    "magnitude": ["magnitude"],
    "taylor": ["taylor"],
    "taylor-fisher": [{"name": "taylor", "order": 2}],
    "activation": ["activation"],
    "fluctuation": ["fluctuation"],
    "learned": [{"name": "learned", "steps": 8}],
    "all-five": ["magnitude", "taylor", "activation", "fluctuation", {"name": "learned", "steps": 8}],
}
LARGE_CASES = ("forward-only", "plain-backward", "taylor")  # the cases also measured at the larger sample counts


def rss_bytes(field: str = "VmRSS") -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def plain_backward(model, batches) -> None:
    """The baseline: gradients of every parameter, accumulated and kept, as a naive implementation does."""
    for p in model.parameters():
        p.requires_grad_(True)
    for ids in batches:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def forward_only(model, batches) -> None:
    """The floor: inference over the same samples, no gradients at all."""
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, labels=ids, use_cache=False)


REFERENCES = {"forward-only": forward_only, "plain-backward": plain_backward}


def child(case: str, samples: int) -> dict:
    """Run one case in this process and return its measurements."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from adaprune import Pruner
    from adaprune.tools.data import load_smollm2, token_batches, wiki_texts

    runtime = rss_bytes()
    model, tokenizer = load_smollm2()
    model_bytes = sum(p.numel() * 4 for p in model.parameters())  # float32; tied weights count once
    batches = token_batches(tokenizer, wiki_texts("calibration"), seq_len=SEQ_LEN, num_samples=samples, batch_size=1)
    # The weights may be memory-mapped from the checkpoint: touch every page now, so that the
    # peak below is the calibration's and "before" holds the whole model.
    sum(float(p.detach().sum()) for p in model.parameters())
    exact = reset_peak()
    before = rss_bytes()
    start = time.perf_counter()
    if CASES[case] is None:
        REFERENCES[case](model, batches)
    else:
        Pruner(model, estimators=CASES[case], progress=False).score(batches)
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    return {"case": case, "samples": samples, "tokens_per_sample": SEQ_LEN, "model_mib": model_bytes / 2**20,
            "runtime_mib": runtime / 2**20, "rss_before_mib": before / 2**20, "peak_mib": peak / 2**20,
            "ratio": peak / model_bytes, "ratio_above_runtime": (peak - runtime) / model_bytes,
            "ratio_added": (peak - before) / model_bytes,
            "seconds": seconds, "peak_method": "VmHWM after clear_refs" if exact else "VmHWM, model loading included"}


def run_case(case: str, samples: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", case, "--samples", str(samples)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Calibration memory on SmolLM2-135M",
        "",
        f"Peak resident memory while scoring, divided by the float32 model's size "
        f"({results[0]['model_mib']:.0f} MiB). Samples of {SEQ_LEN} tokens, one sample per pass; "
        "every case in a fresh process. *Whole process* counts Python, torch and transformers too "
        f"({results[0]['runtime_mib']:.0f} MiB before the model is loaded); *above runtime* is what "
        "calibration itself needs: the model, one pass's activations and the statistics; *added* is "
        "the peak minus the resident memory once the model, tokenizer and samples are loaded. Target for "
        "Taylor: under 2.0; `forward-only` (inference, no gradients) is the floor, a plain backward that "
        "keeps every gradient the naive baseline.",
        "",
        "| case | samples | peak MiB | peak / model (whole process) | peak / model (above runtime) | added / model | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['case']} | {r['samples']} | {r['peak_mib']:.0f} | {r['ratio']:.2f} | "
                     f"{r['ratio_above_runtime']:.2f} | {r['ratio_added']:.2f} | {r['seconds']:.0f} |")
    lines += ["", f"Measured with {results[0]['peak_method']} on {meta['machine']}, {meta['date']}. Seconds are wall "
              "time, for orientation only: the machine may have been shared.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, nargs="+", default=[10, 64])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--quick", action="store_true", help="the first sample count only")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.samples[0])))
        return
    samples = args.samples[:1] if args.quick else args.samples
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for index, n in enumerate(samples):
        for case in args.cases if index == 0 else [c for c in args.cases if c in LARGE_CASES]:
            result = run_case(case, n)
            print(f"{case:>15} {n:>3} samples: peak {result['peak_mib']:.0f} MiB = {result['ratio']:.2f} x model "
                  f"({result['ratio_above_runtime']:.2f} above runtime), {result['seconds']:.0f} s", flush=True)
            results.append(result)
            # Written after every case: a long run that is stopped keeps what it measured.
            (RESULTS / "memory.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            (RESULTS / "memory.md").write_text(markdown(results, meta))


if __name__ == "__main__":
    main()
