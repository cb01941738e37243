"""Weight reconstruction: refit the projections that read removed units, layer by layer, in closed form.

After the plan is applied, each decoder layer in turn (the calibration batches fed through the
layers already reconstructed, so errors do not compound) gets new weights for the projections
that read its units (attention's output projection over the kept heads, the MLP's down
projection over the kept channels; the family spec says which, fused layouts included), so that
the layer's output on the same inputs matches what the dense layer gave:

    W_kept' = (W G[:, K] + lambda W_K) (G[K, K] + lambda I)^-1     (float64; G = E[z z^T] of the full input z)

with a bias fitted alongside where the family has one (this subsumes FLAP's bias compensation).
`target="dense"` fits instead to the dense model's own layer inputs (the cross-moments of the
dense path with the pruned one), which also corrects the error accumulated upstream. The
attention block of a layer is refitted first and the MLP's statistics are taken after it, since
the MLP reads the attention's output. The damping `lambda` is `damping` times the mean diagonal of
G[K, K]; the ridge pulls towards the dense kept weights W_K (`anchor="dense"`, the default: a
large damping keeps them, a small one refits fully) or towards zero (`anchor="zero"`, the plain
ridge, which drops the lambda W_K term). The plain ridge at damping 0.01 fitted the calibration text
and cost perplexity on other text; the anchored one was better on both the calibration hold-out and
a domain-shift dev text (benchmarks/holdout_selection.py anchor): damping 1 from 32 calibration rows,
and from 128 rows (the default calibration) damping 0.3, the default. A system that will not factor gets ten times more damping (recorded in the report),
never NaN. Memory: one layer's Gram matrices and that layer's calibration hidden states at a time.

With `epochs` > 0, each layer is then trained by gradient steps towards the same target
(`layer_training.py`): a repair the closed form cannot make, at high ratios.

The stage runs on the model masked by the plan: the MaskHandle still holds the removed values,
from which the dense layer is rebuilt one layer at a time.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..apply.mask import MaskHandle
from ..apply.positions import pruned_positions
from ..errors import ConfigurationError
from ..plan import Plan
from ..units.layerwise import Stop, forward_layer, forward_until_stopped, layer_inputs
from ..units.model_state import frozen
from ..units.table import LayerUnits
from ..vocabulary import BlockKind
from .base import Stage, StageContext
from .layer_training import TrainingSettings, train_layer

TARGETS = ("pruned", "dense")
ANCHORS = ("zero", "dense")
MAX_RETRIES = 6
AUTO_EPOCHS, AUTO_FROM = 8, 0.2  # epochs="auto": 8 epochs (lr 1e-3) for a plan of ratio 0.2 or more
ROWS_PER_BATCH = 4  # also the training's step, as benchmarks/refit_study.py measured it


@dataclass
class _Projection:
    """One projection of a layer that reads units the plan removes."""

    path: str  # inside the model
    inner: str  # inside the decoder layer
    linear: nn.Linear
    kept: torch.Tensor  # kept input columns


@dataclass
class LayerwiseState:
    """The calibration hidden states entering the next layer: on the pruned path, on the dense path
    (target "dense" only), the arguments the model passes to its layers, and how long each layer trains."""

    hidden: list[torch.Tensor]
    dense_hidden: list[torch.Tensor] | None
    arguments: list
    epochs: int  # of layer-wise training after each refit


class ReconstructStage(Stage):
    """Closed-form ridge refit of the projections that read removed units (see the module docstring).

    Options: `damping` (ridge, relative to the mean diagonal of the kept Gram matrix), `samples`
    (calibration rows used at most), `target` (``"pruned"``: match the dense layer on the pruned
    model's own inputs; ``"dense"``: match the dense model's layer outputs), `bias` (fit the bias
    where the projection has one), `add_bias` (where a refitted projection has no bias but the family's
    config can switch them on for its block, as Llama's `attention_bias`/`mlp_bias` do: add zero
    biases to that block in every layer, so that the refit can fit them; the stock config then
    describes the model, which has a few more parameters: recorded as `parameters_added`), `anchor`
    (what the ridge pulls the kept weights towards: ``"zero"``, the plain ridge, or ``"dense"``, the
    dense weights, so that a large damping leaves them as they were and a small one refits fully),
    `epochs` and `lr` (after the refit, train every weight matrix of the layer, its kept entries, by
    Adam at learning rate `lr` for `epochs` passes over the rows to give the dense layer's output:
    ``adaprune.stages.layer_training``; 0 epochs skips it; ``"auto"``, the default, trains 8 epochs
    when the plan's ratio is 0.2 or more and not otherwise).
    """

    name = "reconstruct"

    # The defaults (anchor "dense", damping 0.3, 128 rows) were chosen on the calibration hold-out and a
    # domain-shift dev text that is no test text (benchmarks/holdout_selection.py anchor): docs/pipeline.md.
    # With fewer rows, more damping is safer (1 was best from 32).
    def __init__(self, damping: float = 0.3, samples: int = 128, target: str = "pruned", bias: bool = True,
                 add_bias: bool = False, anchor: str = "dense", epochs: int | str = "auto", lr: float = 1e-3):
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping > 0 \
                or not math.isfinite(damping):
            raise ConfigurationError(f"reconstruct damping must be a positive number, got {damping!r}.")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ConfigurationError(f"reconstruct samples must be a positive integer, got {samples!r}.")
        if target not in TARGETS:
            raise ConfigurationError(f"reconstruct target must be one of {TARGETS}, got {target!r}.")
        self.damping, self.samples, self.target, self.bias = float(damping), samples, target, bool(bias)
        self.add_bias = bool(add_bias) and self.bias
        if anchor not in ANCHORS:
            raise ConfigurationError(f"reconstruct anchor must be one of {ANCHORS}, got {anchor!r}.")
        self.anchor = anchor
        if epochs != "auto" and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0):
            raise ConfigurationError(f"reconstruct epochs must be a whole number >= 0 (0: no training) or 'auto', "
                                     f"got {epochs!r}.")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1 or not math.isfinite(lr):
            raise ConfigurationError(f"reconstruct lr must be a learning rate in (0, 1), such as 1e-3; got {lr!r}.")
        self.epochs, self.lr = epochs, float(lr)

    @property
    def options(self) -> dict[str, Any]:
        return {"damping": self.damping, "samples": self.samples, "target": self.target, "bias": self.bias,
                "add_bias": self.add_bias, "anchor": self.anchor, "epochs": self.epochs, "lr": self.lr}

    def run(self, model: nn.Module, plan: Plan, context: StageContext) -> dict[str, Any]:
        batches = self.batches(context.batches, next(model.parameters()).device)
        if not batches:
            return {**self.options, "skipped": "no calibration batches: pass calibration to plan() or apply()"}
        units, layers = context.units, context.units.spec.decoder_layers(model)
        by_layer = projections_by_layer(plan, units, model)
        report = self.new_report(batches, plan)
        report["parameters_added"] = self._add_biases(model, plan, units, by_layer, context.mask)
        with frozen(model), torch.no_grad():
            state = self.start(model, layers[0], batches, plan)
            bar = tqdm(list(zip(units, layers)), desc="reconstruction", unit="layer", disable=not context.progress)
            for layer_units, layer in bar:
                self.refit_layer(layer, layer_units, units.spec, by_layer.get(layer_units.index, []), state,
                                 context.mask, report)
                training = report["layers"][-1].get("training") if report["layers"] else None
                if training:
                    after = "kept the refit" if training.get("kept") else f"{training['loss_after']:.3g}"
                    bar.set_postfix(layer=layer_units.index, loss=f"{training['loss_before']:.3g} -> {after}")
        return report

    # ---- the steps, also driven one resident layer at a time by adaprune.streaming -----------------
    def batches(self, calibration: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """At most `samples` calibration rows, rows of one length together (they differ once padding is removed)."""
        rows = [row for batch in calibration for row in batch.split(1)][: self.samples]
        by_length: dict[int, list[torch.Tensor]] = {}
        for row in rows:
            by_length.setdefault(row.shape[1], []).append(row)
        return [torch.cat(group[i:i + ROWS_PER_BATCH]).to(device)
                for group in by_length.values() for i in range(0, len(group), ROWS_PER_BATCH)]

    def new_report(self, batches: list[torch.Tensor], plan: Plan) -> dict[str, Any]:
        return {**self.options, "rows": sum(b.shape[0] for b in batches), "tokens": sum(b.numel() for b in batches),
                "epochs_trained": self.training_epochs(plan), "layers": [], "warnings": [], "parameters_added": 0}

    def training_epochs(self, plan: Plan) -> int:
        """The layer-wise training's epochs for `plan` (``"auto"``: by the ratio it was made for)."""
        if self.epochs != "auto":
            return self.epochs
        # Measured at 50 %: better on the calibration hold-out and a domain-shift dev text; at 20 %: better in
        # domain and, recovered, closer to the dense model's zero-shot answers, for minutes of CPU
        # (docs/pipeline.md §9). Below 20 % not measured: the cheaper refit alone. A plan read from a file
        # without its ratio falls back to the fraction of prunable parameters it removes.
        ratio = plan.settings.get("ratio")
        if not isinstance(ratio, (int, float)):
            ratio = plan.params["removed"] / max(plan.params["prunable_before"], 1)
        return AUTO_EPOCHS if ratio >= AUTO_FROM else 0

    def start(self, model: nn.Module, first_layer: nn.Module, batches: list[torch.Tensor],
              plan: Plan) -> LayerwiseState:
        """The hidden states entering the first decoder layer (both paths), the layers' arguments, the epochs."""
        hidden, arguments = layer_inputs(model, first_layer, batches)
        return LayerwiseState(hidden, [h.clone() for h in hidden] if self.target == "dense" else None, arguments,
                              self.training_epochs(plan))

    def refit_layer(self, layer: nn.Module, layer_units: LayerUnits, spec, projections: list[_Projection],
                    state: LayerwiseState, mask: MaskHandle, report: dict[str, Any]) -> None:
        """Refit one masked decoder layer's `projections` on `state`, then carry `state` past the layer."""
        pruned = any(mask.zeroes(param) for param in layer.parameters())
        train = state.epochs > 0 and pruned
        dense_layer = _dense_copy(layer, mask) if projections or train or state.dense_hidden is not None else None
        fitted = []
        for block, group in _in_order(projections, layer_units, spec):
            fitted += self._refit(layer, dense_layer, block, group, state.hidden, state.dense_hidden,
                                  state.arguments, mask, report["warnings"], layer_units.index)
        entry: dict[str, Any] = {"layer": layer_units.index, "projections": fitted}
        dense_outputs = None
        if state.dense_hidden is not None or train:
            inputs = state.dense_hidden if state.dense_hidden is not None else state.hidden
            dense_outputs = [forward_layer(dense_layer, h, k) for h, k in zip(inputs, state.arguments)]
        if train:
            entry["training"] = train_layer(layer, state.hidden, dense_outputs, state.arguments, mask,
                                            TrainingSettings(state.epochs, self.lr), seed=layer_units.index)
        if fitted or train:
            report["layers"].append(entry)
        if state.dense_hidden is not None:
            state.dense_hidden = dense_outputs
        state.hidden = [forward_layer(layer, h, k) for h, k in zip(state.hidden, state.arguments)]

    def _add_biases(self, model: nn.Module, plan: Plan, units, by_layer: dict[int, list[_Projection]],
                    mask: MaskHandle) -> int:
        """Switch biases on for each block whose refitted projections lack one, where the config can.

        Returns the bias entries the pruned model will keep (rows the plan removes take theirs along).
        """
        if not self.add_bias:
            return 0
        spec, added = units.spec, 0
        kept_rows = {path: len(kept) for path, _, axis, kept in pruned_positions(plan, units, model) if axis == "out"}
        for kind, key in spec.bias_switches.items():
            lacking = [p for layer in units for p in by_layer.get(layer.index, [])
                       if p.linear.bias is None and p.inner in _block_paths(spec, layer, kind)]
            if not lacking:
                continue
            for layer, layer_plan, module in zip(units, plan.layers, spec.decoder_layers(model)):
                if kind in layer.shape.removed_blocks() or kind in layer_plan.removed_blocks():
                    continue
                for path in _block_paths(spec, layer, kind):
                    linear = module.get_submodule(path)
                    if linear.bias is None:
                        mask.add_bias(linear)
                        added += kept_rows.get(f"{layer.path}.{path}", linear.out_features)
            mask.set_config(model.config, key, True)
        return added

    # ---- one group of projections (the attention's, then the MLP's) ----------------------------------
    def _refit(self, layer: nn.Module, dense_layer: nn.Module, block: list[str], group: list[_Projection], hidden,
               dense_hidden, kwargs, mask: MaskHandle, warnings: list[str], index: int) -> list[dict[str, Any]]:
        """Refit `group` (the projections of one block that read removed units) from the full inputs
        of the dense block (every projection path in `block` restored) on `hidden`."""
        # The pruned layer up to this block (earlier blocks already refitted), this block dense.
        probe = copy.deepcopy(layer)
        for name, param in layer.named_parameters():
            if name.rpartition(".")[0] in block:
                _set_param(probe, name, mask.original(param))
        stats = {p.inner: _Moments(p.linear.in_features, paired=dense_hidden is not None) for p in group}
        with _capture_inputs(probe, [p.inner for p in group], stats, "pruned"):
            for h, k in zip(hidden, kwargs):
                forward_until_stopped(probe, h, k)
        if dense_hidden is not None:
            with _capture_inputs(dense_layer, [p.inner for p in group], stats, "dense"):
                for h, k in zip(dense_hidden, kwargs):
                    forward_until_stopped(dense_layer, h, k)
        del probe
        fitted = []
        for projection in group:
            result = self._solve(projection, stats[projection.inner], mask)
            if result.pop("damping_raised", False):
                warnings.append(f"layer {index} {projection.inner}: the system would not factor; refitted with "
                                f"damping {result['damping']:.3g}")
            fitted.append(result)
        return fitted

    def _solve(self, projection: _Projection, moments: _Moments, mask: MaskHandle) -> dict[str, Any]:
        linear = projection.linear
        device = moments.gram.device  # the solve runs where the sums are
        kept = projection.kept.to(device)
        weight = mask.original(linear.weight).to(device=device, dtype=torch.float64)
        bias = mask.original(linear.bias).to(device=device, dtype=torch.float64) if linear.bias is not None else None
        n, k = moments.count, len(kept)
        # Only the kept columns of the Gram matrices are needed: E[z z_K^T] (on the dense path when asked)
        # and E[z_K z_K^T]. One width x |K| slice at a time; the full sums are dropped as soon as read.
        mean = moments.sum / n
        cross_mean = moments.dense_sum / n if moments.dense_count else mean
        columns = (moments.cross if moments.dense_count else moments.gram)[:, kept].div_(n)
        system = moments.gram[kept[:, None], kept].div_(n)
        moments.gram = moments.cross = None
        # Right-hand side: E[target z_K^T] with target = W z (+ b).
        rhs = weight @ columns
        del columns
        fit_bias = self.bias and bias is not None
        if fit_bias:  # augment z_K with a constant 1 (the bias is not damped)
            system = torch.cat([torch.cat([system, mean[kept, None]], 1),
                                torch.cat([mean[kept], mean.new_ones(1)])[None]], 0)
            target_mean = weight @ cross_mean + bias
            rhs = torch.cat([rhs + bias[:, None] * mean[kept][None], target_mean[:, None]], 1)
        diagonal = system.diagonal()[:k]
        undamped = diagonal.clone()
        scale = float(undamped.mean()) or 1.0
        damping, raised = self.damping, False
        for _ in range(MAX_RETRIES):
            diagonal.copy_(undamped + damping * scale)  # damped in place: no second k x k matrix
            anchored = rhs.clone()
            if self.anchor == "dense":  # the ridge term pulls towards the dense weights, not towards zero
                anchored[:, :k] += damping * scale * weight[:, kept]
            factor, info = torch.linalg.cholesky_ex(system)
            if int(info) == 0:
                solution = torch.cholesky_solve(anchored.T, factor).T
                if bool(torch.isfinite(solution).all()):
                    break
            damping, raised = damping * 10, True
        else:
            raise ConfigurationError(f"Reconstruction of {projection.path} found no usable solution even with "
                                     f"damping {damping:g}; run with reconstruct=False, or more calibration samples.")
        del system, factor
        new_weight = torch.zeros_like(weight)
        new_weight[:, kept] = solution[:, :k]
        mask.replace(linear.weight, new_weight)
        if fit_bias:
            mask.replace(linear.bias, solution[:, k])
        return {"projection": projection.path, "kept_inputs": len(kept), "damping": damping,
                "damping_raised": raised}


#: The options `ReconstructStage` takes (for error messages), read from its signature so they cannot drift.
OPTIONS = tuple(inspect.signature(ReconstructStage).parameters)


class _Moments:
    """Running sums of one projection's full input over the calibration tokens (float64).

    The sums live on the inputs' device (a GPU's float64 products are far faster than copying every
    batch's inputs to the host), except on MPS, which has no float64.
    """

    def __init__(self, width: int, paired: bool):
        self.width = width
        self.paired = paired  # the dense path follows: keep each batch's inputs to pair them
        self.count, self.dense_count = 0, 0
        self.gram = self.sum = self.cross = self.dense_sum = None  # allocated where the first input is
        self._pruned: list[torch.Tensor] = []  # this batch's pruned-path inputs, to pair with the dense ones

    def _allocate(self, device: torch.device) -> None:
        width = self.width
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.cross = torch.zeros(width, width, dtype=torch.float64, device=device) if self.paired else None
        self.dense_sum = torch.zeros(width, dtype=torch.float64, device=device)  # sum of z_dense; cross: z_dense z^T

    def add(self, x: torch.Tensor, path: str) -> None:
        device = x.device if x.device.type != "mps" else torch.device("cpu")
        if self.gram is None:
            self._allocate(device)
        z = x.detach().reshape(-1, x.shape[-1]).to(device=self.gram.device, dtype=torch.float64)
        if path == "pruned":
            self.count += z.shape[0]
            self.gram += z.T @ z
            self.sum += z.sum(0)
            if self.paired:
                self._pruned.append(z)
        else:  # the dense path comes after the pruned one, batch by batch in the same order
            pruned = self._pruned.pop(0)
            self.dense_count += z.shape[0]
            self.cross += z.T @ pruned
            self.dense_sum += z.sum(0)


def projections_by_layer(plan: Plan, units, model: nn.Module) -> dict[int, list[_Projection]]:
    """The "in" projections the plan shrinks, per layer (blocks removed whole have none)."""
    by_path = {layer.path: layer.index for layer in units}
    result: dict[int, list[_Projection]] = {}
    for path, linear, axis, kept in pruned_positions(plan, units, model):
        if axis != "in":
            continue
        layer_path = next(p for p in by_path if path.startswith(f"{p}."))
        result.setdefault(by_path[layer_path], []).append(
            _Projection(path, path[len(layer_path) + 1:], linear, kept))
    return result


def _block_paths(spec, layer: LayerUnits, kind: BlockKind) -> list[str]:
    """The paths, inside the decoder layer, of every projection of its `kind` block."""
    if kind is BlockKind.ATTENTION:
        return [p.path for p in spec.attention_projections(layer.shape.attention)]
    return [p.path for p in spec.mlp_projections(layer.shape.mlp_width)]


def _in_order(projections: list[_Projection], layer: LayerUnits, spec) -> list[tuple[list[str], list[_Projection]]]:
    """The layer's projections grouped by block, attention first (the MLP reads its output), each
    with the paths of every projection of its block."""
    groups = [(paths, [p for p in projections if p.inner in paths])
              for paths in (_block_paths(spec, layer, kind) for kind in (BlockKind.ATTENTION, BlockKind.MLP))]
    return [(paths, group) for paths, group in groups if group]


def _dense_copy(layer: nn.Module, mask: MaskHandle) -> nn.Module:
    """A copy of the decoder layer with every value the mask changed put back (one layer's memory)."""
    dense = copy.deepcopy(layer)
    for name, param in layer.named_parameters():
        restored = mask.original(param)
        if not torch.equal(restored, param.detach()):
            _set_param(dense, name, restored)
    return dense


def _set_param(module: nn.Module, name: str, values: torch.Tensor) -> None:
    param = module.get_parameter(name)
    with torch.no_grad():
        param.copy_(values.to(dtype=param.dtype, device=param.device))


@contextmanager
def _capture_inputs(module: nn.Module, paths: list[str], stats: dict[str, _Moments], path_kind: str) -> Iterator[None]:
    """Accumulate the inputs of `paths` inside `module`; stop the forward once the last one is seen."""
    handles = []
    last = paths[-1]
    for path in paths:

        def hook(_module, args, _path=path):
            stats[_path].add(args[0], path_kind)
            if _path == last:
                raise Stop

        handles.append(module.get_submodule(path).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
