"""One rank of the two-process tests of tests/test_distributed.py (run as a script, one per rank).

    python tests/dist_worker.py OUT_DIR SCENARIO     (env: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)

Writes OUT_DIR/rank<r>.pt with what this rank computed, or OUT_DIR/rank<r>.err with its error.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from families import FAMILIES, Shape, build  # noqa: E402


def model():
    return build(FAMILIES[0], Shape(layers=2, kv_heads=2, heads_per_group=2, head_dim=8, width=32))


def batches(count: int = 5):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (2, 12), generator=generator) for _ in range(count)]


def taylor_terms():
    from adaprune.plugins import parse_estimator

    estimators = [parse_estimator({"name": "taylor", "order": 2, "reduction": "max"}),
                  parse_estimator("taylor")]
    return list({t.name: t for e in estimators for t in e.gradient_terms()}.values())


def statistics() -> dict:
    """The raw calibration statistics: gradient terms (per unit, per position, per sample) and activations."""
    from adaprune.scoring.calibration import calibrate
    from adaprune.plugins import detect_spec
    from adaprune.units.table import UnitTable

    m = model()
    table = UnitTable(m, detect_spec(m))
    stats = calibrate(m, table, batches(), activations=True, gradient_terms=taylor_terms(), progress=False)
    return {"gradient_terms": stats.gradient_terms, "position_terms": stats.position_terms,
            "activations": {k: (v.count, v.mean, v.m2) for k, v in stats.activations.items()},
            "counts": (stats.samples, stats.tokens, stats.passes, stats.mean_loss)}


def plans() -> dict:
    """Plans for taylor and activation with a fusion that does not train, and the adaptive one."""
    from adaprune import Pruner

    out = {}
    for name, estimators, fusion in [("taylor", ["taylor"], "coarse"), ("activation", ["activation"], "coarse"),
                                     ("adaptive", ["taylor", "activation"], "adaptive")]:
        pruner = Pruner(model(), ratio=0.3, estimators=estimators, fusion=fusion, progress=False,
                        fusion_options={"steps": 4, "eval_every": 2} if fusion == "adaptive" else None)
        plan = pruner.plan(batches())
        out[name] = {"layers": plan.to_dict()["layers"], "scores": plan.scores, "sites": plan.fusion["sites"],
                     "calibration": pruner.calibration}
    return out


def main() -> None:
    out, scenario = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    timeout = timedelta(seconds=float(os.environ.get("ADAPRUNE_DIST_TIMEOUT", "20")))
    dist.init_process_group("gloo", timeout=timeout)
    try:
        if scenario == "die" and rank == 1:
            os._exit(3)  # a rank that dies before it calibrates
        if scenario == "hang" and rank == 1:
            import time

            time.sleep(40)  # a rank that hangs: the other must give up after its timeout
            os._exit(4)
        result = {"statistics": statistics()} if scenario in ("exact", "die", "hang") else {}
        if scenario == "exact":
            result["plans"] = plans()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException as error:
        (out / f"rank{rank}.err").write_text(f"{type(error).__module__}.{type(error).__name__}: {error}\n"
                                             + traceback.format_exc())
        os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
