"""One calibration pass that gathers exactly the statistics the enabled estimators declared.

* ``activations``: per input channel of every prunable Linear, running count, mean and sum of
  squared deviations (Welford/Chan, float64), from forward pre-hooks.
* ``gradients``: each estimator names elementwise *gradient terms* f(w, g). As soon as a
  parameter's gradient is ready, every term is evaluated, summed into per-unit totals for each
  level, and the gradient is dropped. No full-size gradient or accumulator outlives its
  parameter's turn: memory is the model, the activations of one pass, and per-unit scalars.
* ``per_position``: a term may keep one total per row (or column) of each prunable parameter
  instead of per unit, for estimators that take a nonlinear function (abs, max, product) of the
  row totals after the pass. That is a few thousand scalars per layer, still no gradient copy.
* ``per_sample``: gradient passes are split into single samples (for Fisher-style terms).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError
from . import distributed
from ..units.model_state import preserved
from ..units.positionwise import positionwise_sum
from ..units.table import Member, UnitTable
from ..vocabulary import LEVELS, Level

GradientFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GradientTerm:
    """An elementwise function of (weight, gradient) to be summed over all passes.

    The sum is kept per unit of each level, or with `per_position` per row (or column) of each
    prunable parameter, summed over its other dimension. `per_sample` splits passes into samples.
    """

    name: str
    fn: GradientFn
    per_sample: bool = False
    per_position: bool = False


@dataclass
class ActivationStats:
    """Running per-channel statistics of a Linear's input (float64)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor  # sum of squared deviations from the mean

    @property
    def variance(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1, 1)

    @property
    def sum_of_squares(self) -> torch.Tensor:
        return self.m2 + self.count * self.mean**2

    def update(self, x: torch.Tensor) -> None:
        moments = batch_moments(x)
        if moments is not None:
            self.merge(*moments)

    def merge(self, n: int, batch_mean: torch.Tensor, batch_m2: torch.Tensor) -> None:
        """Chan's merge of one batch's (count, mean, M2) into the running statistics."""
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total


#: Float64 elements of the one temporary `batch_moments` holds at a time on the CPU (about 1 MiB).
MOMENT_CHUNK_ELEMENTS = 1 << 17
#: Blocks of columns start at multiples of this: torch's CPU sum over rows takes the columns in
#: vector groups counted from the first one (4 vectors: 16 doubles with AVX2, 32 with AVX-512), and a
#: column's sum is the same only where it falls in the same kind of group.
MOMENT_COLUMN_ALIGNMENT = 64


def batch_moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(count, mean, M2) per channel of one batch of inputs (float64), or None for an empty one.

    Each channel's mean is the float64 sum of its column divided by the count, and its M2 the sum
    of its squared deviations from that mean. The channels are independent, so on the CPU they are
    taken a block of columns at a time: the float64 temporary is about a megabyte instead of a copy
    of the whole activation (a [tokens, 2816] float64 copy is 46 MiB at 2048 tokens, and upcast,
    deviation and square were three of them). In blocks aligned to torch's vector groups
    (`MOMENT_COLUMN_ALIGNMENT`) each column is summed in the order the whole matrix sums it, so the
    values are those of the whole matrix at once, bit for bit (tests/test_streaming.py holds them
    to the unblocked formula).
    Elsewhere (an accelerator's reductions may order a column's sum by the matrix's width) the whole
    activation is taken at once, upcast once and squared in place.
    """
    x = x.detach().reshape(-1, x.shape[-1])
    n, channels = x.shape
    if n == 0:
        return None
    if x.device.type != "cpu" or not x.is_contiguous():
        return n, *_moments(x)
    width = max(1, MOMENT_CHUNK_ELEMENTS // n // MOMENT_COLUMN_ALIGNMENT) * MOMENT_COLUMN_ALIGNMENT
    # Whole blocks, the last one taking the remainder: its columns past the last vector group then
    # fall where they fall in the whole matrix (a narrow block of its own would be summed otherwise).
    starts = list(range(0, channels - width + 1, width))
    if len(starts) < 2:
        return n, *_moments(x)
    ends = starts[1:] + [channels]
    means, m2s = zip(*(_moments(x[:, start:end]) for start, end in zip(starts, ends)))
    return n, torch.cat(means), torch.cat(m2s)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of a [rows, columns] block: the float64 mean and the sum of squared deviations,
    with one float64 copy of the block (deviation and square computed in it, in place)."""
    x = x.to(torch.float64, copy=True)
    mean = x.mean(0)
    return mean, x.sub_(mean).pow_(2).sum(0)


@dataclass
class PassRecord:
    """What one forward (and backward) pass contributes, before it is folded into the totals.

    With one process a record is folded as soon as its pass ends; with several, every rank keeps
    the records of its passes and `distributed.combine` hands all of them back in pass order, so the
    totals are added in the single-process order, bit for bit.
    """

    loss: float = float("nan")
    samples: int = 0  # rows of the batch this pass opens (0 for the later samples of a split batch)
    tokens: int = 0
    activations: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    gradients: dict[tuple[str, Level, int], torch.Tensor] = field(default_factory=dict)
    positions: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


@dataclass
class CalibrationStats:
    """What one calibration pass gathered."""

    activations: dict[str, ActivationStats] = field(default_factory=dict)
    # term name -> level -> one float64 tensor of per-unit totals per layer
    gradient_terms: dict[str, dict[Level, list[torch.Tensor]]] = field(default_factory=dict)
    # per-position term name -> parameter name -> float64 totals per row (or column)
    position_terms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # the token batches themselves, kept only for estimators that need "calibration_data"
    batches: list[torch.Tensor] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    passes: int = 0
    mean_loss: float = float("nan")


def _ids(value: Any, what: str) -> torch.Tensor:
    """Token ids (or a mask) as a LongTensor; floats are refused, not truncated."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CalibrationError(f"A calibration batch's {what} cannot be read as a tensor ({error}); give lists or "
                               "tensors of token ids, shape [batch, seq_len].") from error
    if what == "attention_mask" and tensor.is_floating_point():
        if ((tensor != 0) & (tensor != 1)).any():  # a float mask of 0.0 and 1.0 is common; anything else is not
            raise CalibrationError("A calibration batch's attention_mask holds values other than 0 and 1; give 1 "
                                   "for tokens and 0 for padding.")
        return tensor.long()
    if tensor.is_floating_point() or tensor.is_complex():
        raise CalibrationError(f"A calibration batch's {what} holds {tensor.dtype} values; token ids must be "
                               "integers (tokenize the text, or pass tokenizer= with texts).")
    return tensor.long()


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The rows of a padded batch without their padding, batched by length (padding never reaches the
    model, so it is neither in the loss nor in any statistic, for every estimator and stage alike)."""
    rows: dict[int, list[torch.Tensor]] = {}
    for row, keep in zip(ids, mask.bool()):
        positions = torch.nonzero(keep).flatten()
        if positions.numel() and positions[-1] - positions[0] + 1 != positions.numel():
            raise CalibrationError("A calibration row's attention_mask has padding between its tokens; only left or "
                                   "right padding can be removed. Give each sequence as its own row.")
        if positions.numel() >= 2:  # a row of one real token predicts nothing
            rows.setdefault(positions.numel(), []).append(row[positions])
    return [torch.stack(group[i:i + len(ids)]) for group in rows.values() for i in range(0, len(group), len(ids))]


def as_batches(calibration: Iterable) -> list[torch.Tensor]:
    """Normalise calibration input to a list of [batch, seq] LongTensors; refuse empty input.

    An item is token ids (a tensor or nested lists, [batch, seq] or [seq]) or a mapping with
    `input_ids` and optionally `attention_mask` (a dict, or a tokenizer's `BatchEncoding`); padded
    positions are removed, so that they are neither in the loss nor in any statistic.
    """
    if isinstance(calibration, (Mapping, torch.Tensor)):
        calibration = [calibration]  # one batch given on its own
    batches = []
    for item in calibration:
        mask = None
        if isinstance(item, Mapping):
            if "input_ids" not in item:
                raise CalibrationError(f"A calibration batch is a mapping without 'input_ids' (keys: "
                                       f"{', '.join(map(str, item))}); give the tokenizer's output or token-id tensors.")
            mask = item.get("attention_mask")
            item = item["input_ids"]
        batch = _ids(item, "input_ids")
        if batch.dim() == 1:
            batch = batch.unsqueeze(0)
        if batch.dim() != 2 or batch.numel() == 0:
            raise CalibrationError(f"A calibration batch has shape {tuple(batch.shape)}; expected token ids of "
                                   "shape [batch, seq_len] with at least one token.")
        if batch.shape[1] < 2:
            raise CalibrationError("Calibration sequences need at least 2 tokens (the loss predicts the next one).")
        if mask is not None:
            mask = _ids(mask, "attention_mask")
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            if mask.shape != batch.shape:
                raise CalibrationError(f"A calibration batch's attention_mask has shape {tuple(mask.shape)}, its "
                                       f"input_ids {tuple(batch.shape)}; give a mask of the same shape (1 = token, "
                                       "0 = padding).")
            if ((mask != 0) & (mask != 1)).any():
                raise CalibrationError("A calibration batch's attention_mask holds values other than 0 and 1; give 1 "
                                       "for tokens and 0 for padding.")
            if not bool(mask.all()):
                batches.extend(_unpadded(batch, mask))
                continue
        batches.append(batch)
    if not batches:
        raise CalibrationError("The calibration set is empty (or only padding); pass at least one batch of token ids "
                               "(e.g. adaprune.data.token_batches(tokenizer, texts, seq_len=128, num_samples=32)).")
    return batches


def check_token_ids(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Refuse, before the pass, ids the model has no embedding for and sequences longer than it can place."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    low = min(int(batch.min()) for batch in batches)
    high = max(int(batch.max()) for batch in batches)
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise CalibrationError(f"The calibration holds token ids from {low} to {high}, but the model's vocabulary "
                               f"has ids 0 to {vocab - 1 if isinstance(vocab, int) else '?'}; tokenize with this "
                               "model's own tokenizer.")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(batch.shape[1] for batch in batches)
    if isinstance(positions, int) and longest > positions:
        raise CalibrationError(f"A calibration sequence has {longest} tokens, more than the model's "
                               f"max_position_embeddings ({positions}); cut the sequences to {positions} tokens or "
                               f"fewer (token_batches(..., seq_len={positions})).")


def calibrate(
    model: nn.Module,
    table: UnitTable,
    calibration: Iterable,
    *,
    activations: bool = False,
    gradient_terms: Iterable[GradientTerm] = (),
    progress: bool = True,
) -> CalibrationStats:
    """Run the calibration batches once through `model`, gathering only what was asked for.

    Under an initialised process group each rank runs its shard of the batches (batch i on rank
    i % world size) and every rank returns the statistics of all of them, equal bit for bit to
    one process's (see `adaprune.scoring.distributed`).
    """
    batches = as_batches(calibration)
    terms = list(gradient_terms)
    stats = CalibrationStats()
    if not activations and not terms:
        return stats
    device = next(model.parameters()).device
    per_sample = any(t.per_sample for t in terms)
    if terms:
        start_gradient_totals(stats, table, terms)
    sharded = distributed.active()
    losses: list[float] = []
    kept: dict[int, PassRecord] = {}  # with several ranks: this rank's records, by global pass index
    current = PassRecord()
    hooks = []
    with preserved(model):
        if activations:
            hooks += activation_hooks(model, table, stats, lambda: current)
        if terms:
            hooks += gradient_hooks(model, table, terms, lambda: current)
        try:
            mine = distributed.shard(batches)
            for index, batch in tqdm(mine, desc="calibration", unit="batch", disable=not progress):
                split = batch.split(1) if per_sample else [batch]
                for part, ids in enumerate(split):
                    current = PassRecord(samples=batch.shape[0] if part == 0 else 0,
                                         tokens=batch.numel() if part == 0 else 0)
                    current.loss = _run_pass(model, ids.to(device), bool(terms))
                    if sharded:
                        kept[_pass_index(batches, index, part, per_sample)] = current
                    else:
                        _fold(stats, current, losses)
        finally:
            for hook in hooks:
                hook.remove()
    if sharded:
        for record in distributed.combine(kept):
            _fold(stats, record, losses)
    stats.mean_loss = sum(losses) / len(losses)
    if any(loss != loss for loss in losses):
        raise CalibrationError("The calibration loss is NaN: check the model's dtype (use float32 for "
                               "calibration) and the token ids.")
    return stats


def start_gradient_totals(stats: CalibrationStats, table: UnitTable, terms: list[GradientTerm]) -> None:
    """Zero per-unit totals for every term (per layer and level), empty per-position ones."""
    stats.gradient_terms = {t.name: {level: [torch.zeros(layer.num_units[level], dtype=torch.float64)
                                             for layer in table] for level in LEVELS}
                            for t in terms if not t.per_position}
    stats.position_terms = {t.name: {} for t in terms if t.per_position}


def _pass_index(batches: list[torch.Tensor], index: int, part: int, per_sample: bool) -> int:
    """The position of pass `part` of batch `index` in the single-process order of passes."""
    if not per_sample:
        return index
    return sum(b.shape[0] for b in batches[:index]) + part


def _run_pass(model: nn.Module, ids: torch.Tensor, backward: bool) -> float:
    """One forward pass (and backward, for gradient terms); the hooks fill the current record."""
    if backward:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    else:
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return float(loss.detach())


def _fold(stats: CalibrationStats, record: PassRecord, losses: list[float]) -> None:
    """Add one pass's contributions to the totals (always in pass order: the sums are order-exact)."""
    losses.append(record.loss)
    stats.samples += record.samples
    stats.tokens += record.tokens
    stats.passes += 1
    fold_statistics(stats, record)


def fold_statistics(stats: CalibrationStats, record: PassRecord) -> None:
    """Add one pass's activation moments and gradient terms to the totals (in pass order: order-exact)."""
    for path, moments in record.activations.items():
        for moment in moments:
            stats.activations[path].merge(*moment)
    for (term, level, layer), partial in record.gradients.items():
        stats.gradient_terms[term][level][layer] += partial
    for (term, name), values in record.positions.items():
        totals = stats.position_terms[term]
        totals[name] = totals[name] + values if name in totals else values


def activation_hooks(model: nn.Module, table: UnitTable, stats: CalibrationStats,
                     record: Callable[[], PassRecord]) -> list:
    """Forward pre-hooks on every prunable Linear of `table` that add each input's moments to `record()`."""
    paths = sorted({m.module_path for layer in table for level in LEVELS for m in layer.members[level]})
    hooks = []
    for path in paths:
        module = model.get_submodule(path)
        stats.activations[path] = ActivationStats(0, torch.zeros(module.in_features, dtype=torch.float64),
                                                  torch.zeros(module.in_features, dtype=torch.float64))

        def note(_module, args, _path=path):
            x = args[0].detach()
            if x.device.type == "mps":  # no float64 there
                x = x.cpu()
            moments = batch_moments(x)  # reduced where the activation lives (a GPU stays a GPU)
            if moments is not None:
                # The float64 statistics live on the CPU on purpose: two vectors per Linear and pass,
                # exact sums, nothing held on the accelerator between passes.
                n, mean, m2 = moments
                record().activations.setdefault(_path, []).append((n, mean.cpu(), m2.cpu()))

        hooks.append(module.register_forward_pre_hook(note))
    return hooks


def gradient_hooks(model: nn.Module, table: UnitTable, terms: list[GradientTerm],
                   record: Callable[[], PassRecord]) -> list:
    """Post-accumulate-grad hooks on every prunable parameter of `table` that fold each gradient into
    `record()` as soon as it is ready, then drop it (the other parameters stop needing gradients)."""
    members: dict[str, list[tuple[Level, int, Member]]] = {}
    layers = {layer.index: layer for layer in table}  # `table` may be a view of some layers
    for layer in table:
        for level in LEVELS:
            for member in layer.members[level]:
                members.setdefault(member.param_name, []).append((level, layer.index, member))
    hooks = []
    for name, param in model.named_parameters():
        if name not in members:
            # Gradients still flow through activations; only prunable parameters need their own.
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)

        def fold(p, _entries=members[name], _name=name):
            w, g = p.detach(), p.grad.detach()
            dim = _entries[0][2].dim  # a parameter is pruned along the same dimension at every level
            current = record()
            for term in terms:
                per_position = positionwise_sum(term.fn, (w, g), dim).cpu()
                if term.per_position:
                    key = (term.name, _name)
                    current.positions[key] = current.positions[key] + per_position if key in current.positions \
                        else per_position
                    continue
                for level, layer_index, member in _entries:
                    owned = member.owner >= 0
                    key = (term.name, level, layer_index)
                    partial = current.gradients.get(key)
                    if partial is None:
                        partial = current.gradients[key] = torch.zeros(
                            layers[layer_index].num_units[level], dtype=torch.float64)
                    partial.index_add_(0, member.owner[owned], per_position[owned])
            p.grad = None  # folded: drop it now, never hold a second copy of the model

        hooks.append(param.register_post_accumulate_grad_hook(fold))
    return hooks
