"""Recovery after pruning: LoRA adapters (through peft) trained briefly on text, then merged back.

    report = RecoveryReport()
    adaprune.recover(model, batches, steps=200, report=report)             # next-token loss
    adaprune.recover(model, batches, teacher=dense_model, report=report)   # KL to the dense model

The adapters sit on the projections the family spec names (attention and MLP of every decoder
layer that still has them). Only the adapters train; the pruned weights stay frozen. After
training each adapter is merged into its projection (`W + B A * alpha / rank`), so the model
keeps the pruned shapes, its class and config, and holds no adapter: `save_pretrained` writes the
same kind of checkpoint as before. An exception (or Ctrl-C) during training removes the
adapters unmerged and leaves the model exactly as it came in.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..apply.mask import MASKED, is_masked
from ..apply.positions import pruned_positions
from ..errors import AdapruneError, CalibrationError
from ..plan import Plan
from ..plugins import detect_spec
from ..scoring.calibration import as_batches
from ..specs import ArchSpec
from .base import Stage, StageContext

__all__ = ["OBJECTIVES", "RecoverStage", "RecoveryError", "RecoveryReport", "lora_targets", "recover",
           "teacher_samples"]

OBJECTIVES = ("lm", "kl")
BLOCKS = ("attention", "mlp")
# generated=None with "kl": windows sampled from the teacher per window of the text. Half: out of domain
# 9-12 % lower perplexity at 1-3 % in domain, and more of the dense model's answers kept (docs/recovery.md).
GENERATED_SHARE = 0.5


class RecoveryError(AdapruneError, ValueError):
    """Recovery cannot run as asked (bad settings, a teacher that does not fit the model)."""


@dataclass
class RecoveryReport:
    """What a recovery did; `recover(..., report=RecoveryReport())` fills it in.

    `losses` holds the training loss of every step (nats per predicted token for `lm`, KL per
    token for `kl`) and `step_seconds` its wall time; `seconds` is the whole training, validation
    included. `validation` holds `(step, loss)` pairs measured on `validation=` batches
    with the same objective (step 0 is before training).
    """

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    trainable_parameters: int = 0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record (losses rounded to 5 digits)."""
        record = asdict(self)
        record["losses"] = [round(v, 5) for v in self.losses]
        record["validation"] = [[step, round(v, 5)] for step, v in self.validation]
        record["step_seconds"] = [round(v, 4) for v in self.step_seconds]
        record["seconds"] = round(self.seconds, 3)
        record["seconds_per_step"] = round(self.seconds_per_step, 4) if self.steps else None
        return record


def lora_targets(model: nn.Module, spec: ArchSpec | None = None,
                 blocks: Sequence[str] = BLOCKS) -> list[str]:
    """Full module names of the Linears that get an adapter: the spec's projections of each layer.

    A block removed whole (a stand-in with no Linear) and a projection left with no weights are
    skipped. A projection the spec lists twice (a fused one) appears once.
    """
    spec = spec or detect_spec(model)
    unknown = set(blocks) - set(BLOCKS)
    if unknown:
        raise RecoveryError(f"Unknown block kind(s) {sorted(unknown)} for LoRA targets; use {list(BLOCKS)}.")
    names = {id(module): name for name, module in model.named_modules()}
    targets: list[str] = []
    for layer in spec.decoder_layers(model):
        shape = spec.layer_shape(model, layer)
        paths: list[str] = []
        if "attention" in blocks and not spec.is_removed(layer, "attention") and shape.attention.num_heads:
            paths += [p.path for p in spec.attention_projections(shape.attention)]
        if "mlp" in blocks and not spec.is_removed(layer, "mlp") and shape.mlp_width:
            paths += [p.path for p in spec.mlp_projections(shape.mlp_width)]
        for path in dict.fromkeys(paths):
            module = layer.get_submodule(path)
            if isinstance(module, nn.Linear) and module.weight.numel():
                targets.append(f"{names[id(layer)]}.{path}")
    return targets


def _training_batches(calibration: Iterable, tokenizer: Any, seq_len: int, samples: int | None,
                      batch_size: int | None) -> list[torch.Tensor]:
    """Token-id batches: texts are joined (blank lines) and cut into windows of `seq_len` tokens."""
    items = list(calibration)
    if items and isinstance(items[0], str):
        if tokenizer is None:
            raise CalibrationError("The recovery text is a list of strings; pass tokenizer= too (or token-id "
                                   "batches, e.g. adaprune.tools.data.token_batches(tokenizer, texts, seq_len=128, "
                                   "num_samples=256)).")
        ids = _text_tokens(tokenizer, items, samples * seq_len if samples else None)
        windows = len(ids) // seq_len
        if windows < 1:
            raise CalibrationError(f"The recovery text has {len(ids)} tokens, fewer than one window of "
                                   f"{seq_len}: give more text or a smaller seq_len.")
        rows = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
        return list(rows.split(batch_size or 4))
    batches = as_batches(items)
    if batch_size and len({b.shape[1] for b in batches}) == 1:
        # Same length everywhere: re-cut the rows into batches of the size asked.
        rows = torch.cat(batches)
        if samples:
            rows = rows[:samples]
        return list(rows.split(batch_size))
    if samples:
        raise RecoveryError("samples= needs token batches of one sequence length (or texts); drop samples= "
                            "or pass batches of equal length.")
    return batches


def teacher_samples(teacher: nn.Module, rows: int, seq_len: int, batch_size: int = 4, seed: int = 0,
                    progress: bool = False) -> list[torch.Tensor]:
    """`rows` windows of `seq_len` tokens sampled from `teacher` (BOS first, then nucleus sampling at p 0.95).

    Text in the teacher's own distribution, whatever the user's text covers: distilling on it keeps what
    the dense model does outside the recovery text's domain. Returned as [batch_size, seq_len] batches.
    """
    eos_id = _first(getattr(teacher.config, "eos_token_id", None))
    start_id = _start_token(teacher.config)
    if start_id is None:
        raise RecoveryError("The teacher's config names no bos_token_id (nor eos_token_id) to start sampling "
                            "from; drop generated= or set teacher.config.bos_token_id.")
    device = _device(teacher)
    was_training = teacher.training
    teacher.eval()
    # Generation batches of up to 32 rows: fewer passes than the training batch size would make.
    sizes = [min(32, rows - done) for done in range(0, rows, 32)]
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for size in tqdm(sizes, desc="sampling from the teacher", disable=not progress):
            ids = torch.full((size, 1), start_id, dtype=torch.long, device=device)
            samples.append(teacher.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, top_k=0, temperature=1.0,
                max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=eos_id if eos_id is not None else start_id).cpu())
    teacher.train(was_training)
    return list(torch.cat(samples).split(batch_size))


def _first(token_id: int | Sequence[int] | None) -> int | None:
    """One token id where a config may give several (Llama-3 lists its end tokens)."""
    return int(token_id[0]) if isinstance(token_id, (list, tuple)) else None if token_id is None else int(token_id)


def _start_token(config: Any) -> int | None:
    """The token sampling starts from: BOS, else EOS (None where the config names neither)."""
    bos_id = getattr(config, "bos_token_id", None)
    return _first(bos_id) if bos_id is not None else _first(getattr(config, "eos_token_id", None))


def _text_tokens(tokenizer: Any, texts: list[str], limit: int | None) -> list[int]:
    """Token ids of the texts joined by blank lines (as adaprune's calibration streams are), up to `limit`."""
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for text_ids in tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]:
            ids.extend((separator if ids else []) + text_ids)
        if limit is not None and len(ids) >= limit:
            return ids[:limit]
    return ids


def _order(count: int, generator: torch.Generator) -> Iterator[int]:
    """Batch indices, each pass over the data in a new random order."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))


def _kl_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over the tokens (the positions that predict one)."""
    student = F.log_softmax(logits[:, :-1].float(), dim=-1).flatten(0, 1)
    target = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1).flatten(0, 1).to(student.device)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # peft asks transformers about gradient checkpointing through a deprecated name.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def recover(
    model: nn.Module,
    calibration: Iterable,
    *,
    tokenizer: Any = None,
    steps: int = 200,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-3,
    batch_size: int | None = 4,
    seq_len: int = 128,
    samples: int | None = None,
    objective: str | None = None,
    teacher: nn.Module | None = None,
    blocks: Sequence[str] = BLOCKS,
    dropout: float = 0.0,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    max_grad_norm: float = 1.0,
    validation: Iterable | None = None,
    eval_every: int = 50,
    generated: int | None = None,
    seed: int = 0,
    progress: bool = True,
    report: RecoveryReport | None = None,
    _targets: Sequence[str] | None = None,
    _kept: Mapping[str, tuple[str, torch.Tensor]] | None = None,
    _merge: Callable[[nn.Linear, torch.Tensor], None] | None = None,
) -> nn.Module:
    """Recover a pruned model with LoRA, merged back; returns `model` itself, changed in place.

    Args:
        model: a (pruned) causal LM of a supported family.
        calibration: token-id batches ([batch, seq] LongTensors), or texts with `tokenizer=` (joined with
            blank lines and cut into windows of `seq_len` tokens). Batches of one length are re-cut into
            `batch_size` rows; `samples` keeps only the first that many rows (windows).
        steps: optimizer steps; the batches are visited in a new random order on each pass.
        rank, alpha, dropout: the LoRA adapters' rank, scale (`alpha / rank`) and dropout.
        lr, weight_decay, warmup, max_grad_norm: AdamW on the adapters, linear warm-up over `warmup` of the
            steps then linear decay to zero, gradient norm clipped.
        objective: ``"lm"`` (next-token loss on the text) or ``"kl"`` (KL divergence to `teacher`, the dense
            model, on the same text: distillation). Default: ``"kl"`` with a teacher, else ``"lm"``.
        teacher: the dense model for ``"kl"``; it is only run (no gradients), on its own device.
        blocks: which blocks get adapters, of ``("attention", "mlp")``.
        validation: token-id batches scored with the objective at step 0, every `eval_every` steps and at
            the end, into `report.validation` (for choosing steps and lr on held-out text).
        generated: with ``"kl"``, that many further windows sampled from the teacher itself (from its
            BOS token, nucleus sampling at p 0.95) join the text: the dense model's own distribution as
            training contexts, so that what it knows beyond the text's domain is distilled too. Default
            (None): with ``"kl"``, half as many as the text's windows (`GENERATED_SHARE`; none where the
            teacher's config names no BOS or EOS token to start from); with ``"lm"``, none.
        seed: seeds the adapters' initialisation, the batch order and the sampling (the global RNG is left alone).
        report: a `RecoveryReport` to fill in (steps, tokens, the loss curve, seconds, settings).

    The base weights stay frozen, their dtype and device are the model's. On any exception the adapters
    are removed unmerged: the model is left exactly as it came in.

    (`_targets`, `_kept`, `_merge` serve `RecoverStage` on a masked model: the adapted Linears, the rows
    or columns each may change (the rest stay zero), and how each one's delta is written back.)
    """
    objective = objective or ("kl" if teacher is not None else "lm")
    if objective not in OBJECTIVES:
        raise RecoveryError(f"Unknown objective {objective!r}; use 'lm' (next-token loss) or 'kl' (distillation "
                            "from the dense model, with teacher=).")
    if objective == "kl" and teacher is None:
        raise RecoveryError("objective='kl' distils from the dense model: pass teacher=<the unpruned model> "
                            "(on the command line --teacher DENSE), or use objective='lm'.")
    if objective == "lm" and teacher is not None:
        raise RecoveryError("teacher= is only used by objective='kl'; drop the teacher or use objective='kl'.")
    for name, value in (("steps", steps), ("rank", rank), ("seq_len", seq_len), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise RecoveryError(f"{name} must be a positive integer, got {value!r}.")
    if generated is not None and (not isinstance(generated, int) or isinstance(generated, bool) or generated < 0):
        raise RecoveryError(f"generated must be a non-negative integer (or None: the default), got {generated!r}.")
    if generated and objective != "kl":
        raise RecoveryError("generated= samples text from the teacher, so it needs objective='kl' and teacher=; "
                            "drop generated= or pass the dense model as teacher.")
    for name, value in (("batch_size", batch_size), ("samples", samples)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise RecoveryError(f"{name} must be a positive integer or None, got {value!r}.")
    if not lr > 0 or not alpha > 0:
        raise RecoveryError(f"lr and alpha must be positive, got lr={lr!r}, alpha={alpha!r}.")
    if not 0 <= dropout < 1 or not 0 <= warmup < 1:
        raise RecoveryError(f"dropout and warmup must be in [0, 1), got {dropout!r} and {warmup!r}.")

    if _kept is None and is_masked(model):
        raise RecoveryError("The model is masked by a plan (apply(plan, mode='mask')): adapters would write into "
                            "the zeroed units. Slice it first, or recover inside the Pruner with "
                            "stages=[RecoverStage(...)], which keeps the removed units at zero.")
    import peft

    spec = detect_spec(model)
    batches = _training_batches(calibration, tokenizer, seq_len, samples, batch_size)
    if generated is None:
        generated = (round(GENERATED_SHARE * sum(len(b) for b in batches))
                     if objective == "kl" and _start_token(teacher.config) is not None else 0)
    generation_seconds = 0.0
    if generated:
        start = time.perf_counter()
        batches = batches + teacher_samples(teacher, generated, batches[0].shape[1], batch_size or 4, seed, progress)
        generation_seconds = round(time.perf_counter() - start, 2)
    held_out = as_batches(validation) if validation is not None else []
    targets = list(_targets) if _targets is not None else lora_targets(model, spec, blocks)
    if not targets:
        raise RecoveryError("The model has no projection left to adapt (every block was removed); there is "
                            "nothing to recover.")
    report = report if report is not None else RecoveryReport()
    report.settings = {"objective": objective, "steps": steps, "rank": rank, "alpha": alpha, "lr": lr,
                       "batch_size": batch_size, "seq_len": seq_len, "samples": samples, "blocks": list(blocks),
                       "dropout": dropout, "weight_decay": weight_decay, "warmup": warmup,
                       "max_grad_norm": max_grad_norm, "seed": seed, "training_rows": sum(len(b) for b in batches),
                       "generated": generated, "generation_seconds": generation_seconds}
    report.targets = targets
    device = _device(model)
    if teacher is not None:
        teacher.eval()
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}

    def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = teacher(input_ids=ids.to(_device(teacher)), use_cache=False).logits
        return logits

    def loss_of(net: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        logits = net(input_ids=ids, use_cache=False).logits
        if objective == "lm":
            return _lm_loss(logits, ids)
        target = teacher_logits(ids)
        if target.shape != logits.shape:
            raise RecoveryError(f"The teacher's logits have shape {tuple(target.shape)}, the model's "
                                f"{tuple(logits.shape)}: the teacher must be the dense model of the same "
                                "tokenizer and vocabulary.")
        return _kl_loss(logits, target)

    def validate(net: nn.Module, step: int) -> None:
        if not held_out:
            return
        net.eval()
        with torch.no_grad():
            losses = [loss_of(net, b).item() * b.shape[0] for b in held_out]
        net.train()
        report.validation.append((step, sum(losses) / sum(b.shape[0] for b in held_out)))

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with _quiet():
            wrapped = peft.get_peft_model(model, config)
        try:
            adapted = {name: wrapped.base_model.model.get_submodule(name) for name in targets}
            for name, (axis, kept) in (_kept or {}).items():
                _confine(adapted[name], axis, kept)
            params = [p for p in wrapped.parameters() if p.requires_grad]
            report.trainable_parameters = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            warm = max(1, round(warmup * steps))
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
            order = _order(len(batches), torch.Generator().manual_seed(seed))
            wrapped.train()
            validate(wrapped, 0)
            start = time.perf_counter()
            bar = tqdm(range(steps), desc=f"recovery ({objective})", disable=not progress)
            for step in bar:
                step_start = time.perf_counter()
                ids = batches[next(order)]
                loss = loss_of(wrapped, ids)
                if not torch.isfinite(loss):
                    raise RecoveryError(f"The recovery loss became {loss.item()} at step {step + 1}; lower lr= "
                                        f"(now {lr:g}) or max_grad_norm=.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                schedule.step()
                report.losses.append(loss.item())
                report.tokens += ids.numel()
                report.steps = step + 1
                report.step_seconds.append(time.perf_counter() - step_start)
                report.seconds = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if (step + 1) % eval_every == 0 and step + 1 < steps:
                    validate(wrapped, step + 1)
            validate(wrapped, steps)
            report.seconds = time.perf_counter() - start
        except BaseException:
            with _quiet():
                wrapped.unload()  # the adapters go, unmerged: the base weights were never touched
            _restore(model, was_training, requires_grad)
            raise
        with _quiet(), torch.no_grad():
            if _merge is None:
                merged = wrapped.merge_and_unload()
            else:
                deltas = {name: layer.get_delta_weight("default") for name, layer in adapted.items()}
                merged = wrapped.unload()
                for name, delta in deltas.items():
                    _merge(model.get_submodule(name), delta)
    assert merged is model  # peft hands back the very model it wrapped
    _restore(model, was_training, requires_grad)
    return model


def _confine(layer: nn.Module, axis: str, kept: torch.Tensor) -> None:
    """Let a LoRA adapter change only the `kept` rows (axis "out") or columns ("in") of its weight.

    Its factor on that side starts at zero there and gets zero gradients, so AdamW never moves it and
    B A stays zero outside the kept positions: a masked model trains what its sliced self would.
    """
    factor = layer.lora_B["default"].weight if axis == "out" else layer.lora_A["default"].weight
    keep = torch.zeros(factor.shape[0] if axis == "out" else factor.shape[1], dtype=factor.dtype,
                       device=factor.device)
    keep[kept.to(factor.device)] = 1
    keep = keep[:, None] if axis == "out" else keep[None, :]
    with torch.no_grad():
        factor.mul_(keep)
    factor.register_hook(lambda grad: grad * keep)


def _restore(model: nn.Module, training: bool, requires_grad: dict[str, bool]) -> None:
    """Give every parameter back its `requires_grad` (peft froze them) and the model its mode."""
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))
    model.train(training)


def mean_loss(losses: Sequence[float], last: int = 10) -> float:
    """Mean of the last `last` losses (nan when there are none)."""
    tail = list(losses)[-last:]
    return sum(tail) / len(tail) if tail else math.nan


class RecoverStage(Stage):
    """LoRA recovery as a stage after apply: `Pruner(model, ..., stages=[RecoverStage(steps=200)])`.

    It runs on the model masked by the plan (after reconstruction, before slicing): the adapters go on
    the projections of the blocks the plan keeps, and may change only the rows and columns the plan
    keeps, so that the sliced model computes what was trained and no removed unit comes back. The
    deltas are written through the mask handle: `Pruner.restore()` undoes them with the rest.
    `objective="kl"` (the default) distils from the dense model, rebuilt from the mask's saved values;
    `"lm"` trains on the next-token loss. `calibration` (token batches) replaces the planning batches
    as training data; the other options are `recover`'s.
    """

    name = "recover"

    def __init__(self, calibration: Iterable | None = None, *, objective: str = "kl", **options: Any):
        if objective not in OBJECTIVES:
            raise RecoveryError(f"Unknown objective {objective!r}; use 'lm' or 'kl'.")
        unknown = set(options) - _STAGE_OPTIONS
        if unknown:
            raise RecoveryError(f"Unknown recovery option(s) {sorted(unknown)}; use {sorted(_STAGE_OPTIONS)}.")
        self.calibration = list(calibration) if calibration is not None else None
        self.objective, self.recover_options = objective, options

    @property
    def options(self) -> dict[str, Any]:
        return {"objective": self.objective, **self.recover_options}

    def run(self, model: nn.Module, plan: Plan, context: StageContext) -> dict[str, Any]:
        batches = self.calibration if self.calibration is not None else context.batches
        if not batches:
            return {**self.options, "skipped": "no calibration batches: pass calibration to plan() or apply(), or "
                                               "to RecoverStage"}
        units = context.units
        removed = {(layer.index, prefix) for layer in plan.layers for kind in layer.removed_blocks()
                   for prefix in [f"{units.spec.removable_blocks()[kind].path}."]}
        layer_paths = [layer.path for layer in units]
        targets = [t for t in lora_targets(model, units.spec)
                   if not any(t.startswith(f"{layer_paths[i]}.{prefix}") for i, prefix in removed)]
        kept = {path: (axis, kept) for path, _, axis, kept in pruned_positions(plan, units, model)}
        teacher = None
        if self.objective == "kl":
            # The copy must not take the mask handle (and its saved tensors) along.
            handle = model.__dict__.pop(MASKED, None)
            try:
                teacher = copy.deepcopy(model)
            finally:
                if handle is not None:
                    setattr(model, MASKED, handle)
            with torch.no_grad():
                for (_, original), (_, dense) in zip(model.named_parameters(), teacher.named_parameters()):
                    dense.copy_(context.mask.original(original))

        def merge(linear: nn.Linear, delta: torch.Tensor) -> None:
            context.mask.replace(linear.weight, linear.weight.detach() + delta.to(linear.weight.dtype))

        report = RecoveryReport()
        recover(model, batches, objective=self.objective, teacher=teacher, progress=context.progress,
                report=report, _targets=targets, _kept=kept, _merge=merge, **self.recover_options)
        record = report.to_dict()
        record.pop("targets")
        record["adapted_projections"] = len(targets)
        return record


_STAGE_OPTIONS = {"steps", "rank", "alpha", "lr", "batch_size", "seq_len", "samples", "blocks", "dropout",
                  "weight_decay", "warmup", "max_grad_norm", "validation", "eval_every", "generated", "seed"}
