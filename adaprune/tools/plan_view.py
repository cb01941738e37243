"""Read a Plan back for people: a per-layer table, and a plot (`adaprune report plan.json --plot out.png`).

The table and the plot show what each layer keeps (query heads, KV groups, MLP channels, whole
blocks) and the blend weights fusion chose per site. matplotlib is an optional extra
(`pip install adaprune[plot]`), imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AdapruneError
from ..io import atomic_path
from ..plan import PLAN_FILE, Plan

PLOT_FORMATS = (".png", ".pdf", ".svg")
LEVEL_LABELS = {"kv_group": "kv", "head": "head", "channel": "ch"}


def load_plan(path: str | Path) -> Plan:
    """A plan from its JSON file, or from a pruned checkpoint folder holding `adaprune_plan.json`."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise AdapruneError(f"{path} does not exist: give the plan JSON (Plan.save(), or {PLAN_FILE} in the "
                            "folder `adaprune prune --out` wrote).")
    return Plan.load(path)


def fusion_weights(plan: Plan) -> dict[int, dict[str, dict[str, float]]]:
    """layer -> level -> {candidate: weight}, from the sites the fusion policy recorded."""
    weights: dict[int, dict[str, dict[str, float]]] = {}
    for site in plan.fusion.get("sites") or []:
        # Tolerate policies that record more (or less) per site: take what has the usual shape.
        if isinstance(site, dict) and isinstance(site.get("layer"), int) and isinstance(site.get("weights"), dict):
            weights.setdefault(site["layer"], {})[str(site.get("level"))] = {
                str(name): float(w) for name, w in site["weights"].items() if isinstance(w, (int, float))}
    return weights


def layer_rows(plan: Plan) -> list[dict[str, Any]]:
    """Per layer: kept and original heads, KV groups and channels, the blocks removed, the fusion weights."""
    weights = fusion_weights(plan)
    rows = []
    for layer, before, after in zip(plan.layers, plan.shapes, plan.pruned_shapes()):
        rows.append({
            "layer": layer.index,
            "heads": (after.attention.num_heads, before.attention.num_heads),
            "kv_groups": (after.attention.num_kv_heads, before.attention.num_kv_heads),
            "channels": (after.mlp_width, before.mlp_width),
            "removed_blocks": layer.removed_blocks(),
            "weights": weights.get(layer.index, {}),
        })
    return rows


def _weights_text(by_level: dict[str, dict[str, float]]) -> str:
    """Blend weights per level, levels with the same blend written once ("kv,ch: taylor/coarse=0.50 ...")."""
    levels_of: dict[str, list[str]] = {}
    for level, by_candidate in sorted(by_level.items()):
        blend = " ".join(f"{name}={w:.2f}" for name, w in sorted(by_candidate.items())) or "fallback"
        levels_of.setdefault(blend, []).append(LEVEL_LABELS.get(level, level))
    return "; ".join(f"{','.join(levels)}: {blend}" for blend, levels in levels_of.items()) or "-"


def plan_table(plan: Plan) -> str:
    """The plan as text: a header with sizes and settings, then one line per layer."""
    params, settings = plan.params, plan.settings
    lines = [f"plan for a {plan.model.get('architecture')} ({plan.model.get('family')}), {len(plan.layers)} layers"]
    if settings:
        lines.append(f"ratio {settings.get('ratio')}, allocation {settings.get('allocation')}, "
                     f"units {', '.join(settings.get('units') or [])}, fusion {settings.get('fusion')}")
    if params.get("prunable_before"):
        lines.append(f"parameters {params.get('total_before', 0):,} -> {params.get('total_after', 0):,}; "
                     f"removed {params.get('removed', 0):,} = "
                     f"{params.get('removed', 0) / params['prunable_before']:.1%} of the prunable ones")
    header = ("layer", "heads", "kv groups", "channels", "removed", "fusion weights")
    table = [header]
    for row in layer_rows(plan):
        table.append((str(row["layer"]), "{}/{}".format(*row["heads"]), "{}/{}".format(*row["kv_groups"]),
                      "{}/{}".format(*row["channels"]), "+".join(row["removed_blocks"]) or "-",
                      _weights_text(row["weights"])))
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    for line in table:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    return "\n".join(lines)


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Draw, per layer, the fraction kept of each structure and the blend weights, into `path`."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise AdapruneError(f"Cannot write a plot to {path}: name it with one of {', '.join(PLOT_FORMATS)}.")
    try:
        from matplotlib.figure import Figure  # the optional extra; Figure needs no GUI backend
    except ImportError as error:
        raise AdapruneError("Plotting needs matplotlib, an optional extra: pip install adaprune[plot]") from error
    rows = layer_rows(plan)
    layers = [row["layer"] for row in rows]
    levels = sorted({level for row in rows for level in row["weights"]})
    figure = Figure(figsize=(max(7.0, 0.35 * len(rows) + 5), 2.6 * (1 + len(levels))), layout="constrained")
    axes = figure.subplots(1 + len(levels), 1, sharex=True, squeeze=False)[:, 0]

    kept = axes[0]
    width = 0.27
    for offset, (key, label) in enumerate((("heads", "query heads"), ("kv_groups", "KV groups"),
                                           ("channels", "MLP channels"))):
        fractions = [row[key][0] / row[key][1] if row[key][1] else 0.0 for row in rows]
        positions = [x + (offset - 1) * width for x in layers]
        bars = kept.bar(positions, fractions, width, label=label)
        # A removed block has no bar at all: an x marks it, so it does not read as missing data.
        gone = [x for x, f in zip(positions, fractions) if f == 0]
        kept.plot(gone, [0.03] * len(gone), "x", color=bars.patches[0].get_facecolor() if bars.patches else None)
    kept.set_ylim(0, 1.05)
    kept.set_ylabel("fraction kept")
    kept.set_title("What each layer keeps (x: the whole block removed)")
    kept.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")

    for axis, level in zip(axes[1:], levels):
        candidates = sorted({name for row in rows for name in row["weights"].get(level, {})})
        bottom = [0.0] * len(rows)
        for name in candidates:
            values = [row["weights"].get(level, {}).get(name, 0.0) for row in rows]
            axis.bar(layers, values, 0.8, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.set_ylim(0, 1.05)
        axis.set_ylabel("blend weight")
        axis.set_title(f"Fusion weights, {level} scores")
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(layers)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower())
    return path
