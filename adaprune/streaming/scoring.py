"""Scoring a model larger than memory: one decoder layer resident at a time.

The calibration batches enter the first layer as the model itself computes them (embeddings,
positions, masks: `units.layerwise.layer_inputs`). Forward sweep: each layer in turn is loaded
from the checkpoint, runs every pass with the activation hooks of the in-memory calibration, and
goes back to the meta device, its outputs carried to the next layer. The head (final norm, output
projection, loss) runs through the model's own forward with its layers stood in for (`_Carry`),
which gives the loss (without gradient terms, transformers' causal-LM loss is taken with its
log-probabilities a block of rows at a time: `causal_lm_loss`, the same value) and, for gradient
terms, the gradient at the last layer's output. Backward
sweep (gradient terms only): from the last layer down, each layer is loaded again, rerun on its
saved inputs and backpropagated from the gradient at its output, with the gradient hooks of the
in-memory calibration, handing the gradient at its input to the layer below. Every layer is scored
by every estimator, on one-layer views of the unit table and the statistics, while it is resident.

The statistics are folded pass by pass in the in-memory order and each layer computes what it
computes inside the model, so the scores equal the in-memory ones (bit for bit on the CPU).
Resident: one layer and the calibration hidden states entering it (one set: each pass's output
replaces its input), the weights outside the layers (embeddings, head) only while the batches enter
the first layer and for the head; for gradient terms also the gradients at its output (the inputs of
every layer wait in a temporary folder for the backward sweep). A layer's activation statistics
leave once it is scored, unless bias compensation needs the means. Refused, with the alternative:
estimators that run the whole model themselves (learned), stages other than the reconstruction
(which `adaprune.streaming.writer` runs layer by layer). The adaptive fusion runs the model whole, its layers read from disk
(`adaprune.streaming.offloaded`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigurationError
from ..estimators.base import Estimator, Scores
from ..scoring import distributed
from ..scoring.calibration import (CalibrationStats, PassRecord, activation_hooks, fold_statistics, gradient_hooks,
                                   start_gradient_totals)
from ..stages.base import Stage
from ..stages.reconstruct import ReconstructStage
from ..units.layerwise import LayerArguments, forward_layer, layer_inputs, returns_tuple
from ..units.model_state import preserved
from ..units.table import UnitTable
from ..vocabulary import LEVELS
from .checkpoint import CheckpointWeights, return_freed_memory

#: What a streamed pass can give an estimator.
STREAMED_NEEDS = frozenset({"weights", "activations", "gradients", "per_sample_gradients"})

EstimatorRun = Callable[[Estimator, UnitTable, CalibrationStats], Scores]


def check_streamable(estimators: Sequence[Estimator], stages: Sequence[Stage]) -> None:
    """Refuse, before any work, what cannot run one layer at a time, naming a configuration that can."""
    whole = [e.name for e in estimators if not e.needs <= STREAMED_NEEDS]
    if whole:
        raise ConfigurationError(
            f"With offload, estimator(s) {whole} cannot score: they run the whole model themselves, and offload "
            "holds one layer at a time. Use any of taylor, activation, fluctuation, magnitude.")
    whole_model = [s.name for s in stages if not isinstance(s, ReconstructStage)]
    if whole_model:
        raise ConfigurationError(
            f"With offload, the stage(s) {whole_model} cannot run: they need the whole pruned model in memory. "
            "Save the pruned checkpoint first, then run them on it (adaprune recover PRUNED ...).")
    if any(isinstance(s, ReconstructStage) and s.add_bias for s in stages):
        raise ConfigurationError("With offload, reconstruction cannot add biases (add_bias switches them on in "
                                 "every layer at once); drop add_bias from the reconstruct options.")


def streamed_scores(model: nn.Module, table: UnitTable, weights: CheckpointWeights, batches: list[torch.Tensor],
                    estimators: Sequence[Estimator], run_estimator: EstimatorRun,
                    progress: bool = True) -> tuple[CalibrationStats, dict[str, Scores]]:
    """The calibration statistics and every estimator's scores, one decoder layer resident at a time."""
    if distributed.active():
        raise ConfigurationError("Offload runs in one process: under torch.distributed every rank would stream the "
                                 "whole model. Run it without torchrun, or drop offload.")
    layers = table.spec.decoder_layers(model)
    terms = list({t.name: t for e in estimators for t in e.gradient_terms()}.values())
    activations = any("activations" in e.needs for e in estimators)
    # The passes of the in-memory calibration, in its order: batches, or their rows for per-sample terms.
    passes = [row for b in batches for row in b.split(1)] if any(t.per_sample for t in terms) else list(batches)
    stats = CalibrationStats(samples=sum(b.shape[0] for b in batches), tokens=sum(b.numel() for b in batches))
    if terms:
        start_gradient_totals(stats, table, terms)
    per_layer: dict[int, dict[str, Scores]] = {}
    # Bias compensation reads the input means of every layer when the plan is made; otherwise a
    # layer's statistics leave memory once it is scored (about 15 MiB for a 96-layer 1B model).
    keep_statistics = any(e.compensates_bias for e in estimators)

    def score(index: int) -> None:
        # A one-layer view of the table and of the statistics (per-layer lists cut to this layer).
        view = dataclasses.replace(stats, gradient_terms={
            term: {level: [totals[index]] for level, totals in by_level.items()}
            for term, by_level in stats.gradient_terms.items()})
        per_layer[index] = {e.name: run_estimator(e, table.subset([index]), view) for e in estimators}
        if not keep_statistics:  # scored: its input statistics (float64, two per Linear) are done with
            for path in _module_paths(table.subset([index])):
                stats.activations.pop(path, None)

    with preserved(model):
        if not (activations or terms):  # weights only: nothing to run
            for layer_units in tqdm(list(table), desc="scoring", unit="layer", disable=not progress):
                with weights.resident(model, layer_units.path):
                    score(layer_units.index)
        else:
            paths = [layer.path for layer in table]
            with torch.no_grad():
                # The weights outside the layers (embeddings, final norm, head) are resident for the
                # way into the first layer and for the head, not through the sweep between.
                with _outside(weights, model, paths):
                    hidden, arguments = layer_inputs(model, layers[0], passes)
                inputs = _Spill()  # per layer, its inputs, on disk until the backward sweep
                for layer_units, layer in tqdm(list(zip(table, layers)), desc="streamed calibration",
                                               unit="layer", disable=not progress):
                    with weights.resident(model, layer_units.path):
                        if layer_units.index == 0:
                            as_tuple = returns_tuple(layer, hidden[0], arguments[0])
                        if terms:
                            inputs.push(hidden)
                        hidden = _forward_sweep(model, table.subset([layer_units.index]), layer, hidden,
                                                arguments, stats, activations)
                        if not terms:
                            score(layer_units.index)
            with torch.enable_grad(), _outside(weights, model, paths):
                losses, gradients = _head(model, layers, passes, hidden, as_tuple, backward=bool(terms))
            if terms:
                with torch.enable_grad():
                    for layer_units, layer in tqdm(list(zip(table, layers))[::-1], desc="streamed gradients",
                                                   unit="layer", disable=not progress):
                        with weights.resident(model, layer_units.path):
                            gradients = _backward_sweep(model, table.subset([layer_units.index]), layer,
                                                        inputs.pop(), arguments, gradients, terms, stats,
                                                        first=layer_units.index == 0)
                            score(layer_units.index)
            stats.passes = len(passes)
            stats.mean_loss = sum(losses) / len(losses)
            if any(loss != loss for loss in losses):
                raise CalibrationError("The calibration loss is NaN: check the model's dtype (use float32 for "
                                       "calibration) and the token ids.")
    return stats, {e.name: _stitched([per_layer[i][e.name] for i in sorted(per_layer)]) for e in estimators}


def _forward_sweep(model: nn.Module, view: UnitTable, layer: nn.Module, hidden: list[torch.Tensor],
                   arguments: list[LayerArguments], stats: CalibrationStats, activations: bool) -> list[torch.Tensor]:
    """Every pass through `layer`, its inputs' statistics folded pass by pass (the in-memory order).

    Each pass's output takes its input's place in `hidden` (returned): one set of hidden states is
    resident, not the layer's inputs and outputs both. After each pass the freed heap goes back to
    the system: a heap with free room (a model built before glibc was told to map large blocks on
    their own) serves the activations from it and would keep them resident, a different part each
    pass, until the layer's release (measured: ~55 MiB more on a 1B model's layers).
    """
    current = PassRecord()
    hooks = activation_hooks(model, view, stats, lambda: current) if activations else []
    try:
        for i, a in enumerate(arguments):
            current = PassRecord()
            hidden[i] = forward_layer(layer, hidden[i], a)
            fold_statistics(stats, current)
            return_freed_memory()  # the pass's activations, wherever the heap had room for them
    finally:
        for hook in hooks:
            hook.remove()
    return hidden


def _backward_sweep(model: nn.Module, view: UnitTable, layer: nn.Module, inputs: list[torch.Tensor],
                    arguments: list[LayerArguments], gradients: list[torch.Tensor], terms: list,
                    stats: CalibrationStats, first: bool) -> list[torch.Tensor]:
    """Backpropagate each pass through `layer` from the gradient at its output; fold the gradient terms
    pass by pass; return the gradients at its input (none below the first layer)."""
    current = PassRecord()
    hooks = gradient_hooks(model, view, terms, lambda: current)
    below = []
    try:
        for h, a, grad in zip(inputs, arguments, gradients):
            current = PassRecord()
            x = h.detach().requires_grad_(not first)
            forward_layer(layer, x, a).backward(grad)
            below.append(None if first else x.grad)
            fold_statistics(stats, current)
            return_freed_memory()
    finally:
        for hook in hooks:
            hook.remove()
    return below


@contextmanager
def _outside(weights: CheckpointWeights, model: nn.Module, layer_paths: list[str]) -> Iterator[None]:
    """Every weight outside the decoder layers loaded for the duration of the block."""
    outside = weights.load_outside(model, layer_paths)
    try:
        yield
    finally:
        weights.release_outside(model, outside)


class _Spill:
    """Each layer's calibration inputs, written to a temporary folder on the forward sweep and read
    back, last first, on the backward sweep: one layer's hidden states in memory, not every layer's."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="adaprune-hidden-")
        self._count = 0

    def push(self, hidden: list[torch.Tensor]) -> None:
        torch.save(hidden, Path(self._folder.name) / f"{self._count}.pt")
        self._count += 1

    def pop(self) -> list[torch.Tensor]:
        self._count -= 1
        path = Path(self._folder.name) / f"{self._count}.pt"
        hidden = torch.load(path, weights_only=True)
        path.unlink()
        if self._count == 0:
            self._folder.cleanup()
        return hidden


class _Carry(nn.Module):
    """Stands in for a decoder layer in the head pass: the first hands on the last layer's output,
    the others pass their input through, as the real layers return it (a tensor, or a tuple)."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.value if self.value is not None else hidden_states
        return (out,) if self.as_tuple else out


def _head(model: nn.Module, layers: Sequence[nn.Module], passes: list[torch.Tensor], hidden: list[torch.Tensor],
          as_tuple: bool, backward: bool) -> tuple[list[float], list[torch.Tensor]]:
    """The loss of every pass from the last layer's outputs, through the model's own head; with
    `backward`, the gradient of each loss at those outputs (and at nothing else)."""
    losses, gradients = [], []
    for param in model.parameters():
        param.requires_grad_(False)
    with _stood_in(layers, as_tuple) as first, _lean_loss(model, enabled=not backward):
        for ids, h in zip(passes, hidden):
            first.value = h.detach().requires_grad_(backward)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if backward:
                loss.backward()
                gradients.append(first.value.grad)
            losses.append(float(loss.detach()))
    return losses, gradients


#: Rows of logits whose log-probabilities `causal_lm_loss` holds at a time (about 1 MiB of float32).
LOSS_CHUNK_ELEMENTS = 1 << 18


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`, the same value bit for bit, without its full-size log-probabilities.

    `cross_entropy` is `nll_loss(log_softmax(logits))`: the log-softmax of each row depends on that
    row alone, so it is taken a block of rows at a time and only each token's target entry is kept;
    `nll_loss` then sums those entries in the same (cascaded) order as over the full rows, and
    divides by the same count. A [tokens, vocabulary] float32 copy less (16 MiB for 512 tokens of
    an 8192-word vocabulary). Anything but the plain call (`num_items_in_batch`, given
    `shift_labels`, ...) goes to transformers' own function. Forward only: the gradient is not
    claimed to be the same.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    if kwargs:
        return ForCausalLMLoss(logits, labels, vocab_size, **kwargs)
    ignore = -100
    logits = logits.float().view(-1, vocab_size)
    targets = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:].reshape(-1).to(logits.device)
    picked = torch.zeros(targets.numel(), 1, dtype=logits.dtype, device=logits.device)
    kept = targets != ignore
    rows = max(1, LOSS_CHUNK_ELEMENTS // vocab_size)
    for start in range(0, targets.numel(), rows):
        block = torch.log_softmax(logits[start:start + rows], dim=-1)
        picked[start:start + rows] = block.gather(1, targets[start:start + rows].clamp(min=0).unsqueeze(1))
        del block
    return nn.functional.nll_loss(picked, torch.where(kept, 0, ignore), ignore_index=ignore, reduction="mean")


@contextmanager
def _lean_loss(model: nn.Module, enabled: bool) -> Iterator[None]:
    """The model computes its loss with `causal_lm_loss` for the duration, where its loss is
    transformers' `ForCausalLMLoss` (the decoder families); otherwise, or not `enabled`, as it is."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover (an older transformers: its own loss)
        enabled = False
    if not enabled or getattr(model, "loss_function", None) is not ForCausalLMLoss:
        yield
        return
    had = "_loss_function" in vars(model)
    previous = vars(model).get("_loss_function")
    model.loss_function = causal_lm_loss
    try:
        yield
    finally:
        if had:
            model.loss_function = previous
        else:
            del model._loss_function


@contextmanager
def _stood_in(layers: Sequence[nn.Module], as_tuple: bool) -> Iterator[_Carry]:
    if not isinstance(layers, nn.ModuleList):
        raise ConfigurationError(f"Offload needs the decoder layers in an nn.ModuleList, not a "
                                 f"{type(layers).__name__}; prune this model in memory.")
    originals = list(layers)
    stand_ins = [_Carry(as_tuple) for _ in originals]
    for i, stand_in in enumerate(stand_ins):
        layers[i] = stand_in
    try:
        yield stand_ins[0]
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


def _module_paths(view: UnitTable) -> set[str]:
    return {m.module_path for layer in view for level in LEVELS for m in layer.members[level]}


def _stitched(layers: list[Scores]) -> Scores:
    """One estimator's one-layer scores, layer after layer, as scores of the whole table."""
    return {granularity: {level: [layer[granularity][level][0] for layer in layers] for level in by_level}
            for granularity, by_level in layers[0].items()}
