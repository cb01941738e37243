"""More than one process: the calibration batches sharded over ranks, the statistics combined exactly.

Everything here is a no-op with one process (or no initialised ``torch.distributed`` process
group), so the rest of adaprune calls it unconditionally and never asks about ranks:

* `shard(items)` gives this rank its share, with the original indices: item ``i`` goes to rank
  ``i % world_size``.
* `combine(records)` gathers every rank's ``{index: record}`` and returns all records in index
  order, on every rank. The caller folds them in that order, so floating-point sums are added in
  exactly the order one process adds them: the result is bit for bit the single-process one (an
  ``all_reduce`` would sum in the backend's order instead).
* `average_gradients(params)` averages gradients across ranks (data parallel training).

Collectives are torch.distributed's (gloo on CPU, NCCL on GPUs); a rank that dies or hangs makes
the others raise `DistributedError` naming it (gloo's ``monitored_barrier``) once the process
group's timeout has passed, instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import DistributedError

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks (the CLI's process group; env ADAPRUNE_DIST_TIMEOUT).
DEFAULT_TIMEOUT = 1800.0


def active() -> bool:
    """Whether an initialised process group with more than one rank is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (the one that applies, reconstructs and saves)."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of `items` with their indices: item i goes to rank i % world_size."""
    size, me = world_size(), rank()
    return [(i, item) for i, item in enumerate(items) if i % size == me]


def combine(records: dict[int, Any], what: str = "calibration statistics") -> list[Any]:
    """Every rank's `{index: record}` gathered, as one list in index order (the same on every rank)."""
    if not active():
        return [records[i] for i in sorted(records)]
    _arrive(what)
    gathered: list[dict[int, Any] | None] = [None] * world_size()
    _collective(what, dist.all_gather_object, gathered, records, arrived=True)
    merged: dict[int, Any] = {}
    for part in gathered:
        merged.update(part or {})
    return [merged[i] for i in sorted(merged)]


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks in place (every rank ends with the same bits)."""
    if not active():
        return
    size = world_size()
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        _collective("the fusion's gradients", dist.all_reduce, param.grad)
        param.grad.div_(size)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank."""
    if not active():
        return flag
    box = [flag]
    _collective("a flag", dist.broadcast_object_list, box, src=0)
    return bool(box[0])


def timeout_from_env(default: float = DEFAULT_TIMEOUT) -> timedelta:
    """The collective timeout: ADAPRUNE_DIST_TIMEOUT seconds if set, else `default`."""
    raw = os.environ.get("ADAPRUNE_DIST_TIMEOUT")
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        raise DistributedError(f"ADAPRUNE_DIST_TIMEOUT={raw!r} is not a number of seconds.") from None
    if seconds <= 0:
        raise DistributedError(f"ADAPRUNE_DIST_TIMEOUT must be positive, got {raw!r}.")
    return timedelta(seconds=seconds)


def init_from_env(timeout: timedelta | None = None) -> bool:
    """Initialise a process group from torchrun's environment (WORLD_SIZE > 1); True if this call did.

    gloo carries the collectives: the statistics live on the CPU (float64) whatever the device.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    timeout = timeout or timeout_from_env()
    try:
        dist.init_process_group("gloo", timeout=timeout)
    except Exception as error:  # the rendezvous failed: say what it needs
        raise DistributedError(f"Could not join the process group ({type(error).__name__}: {error}); run under "
                               "torchrun, or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE.") from error
    return True


def shutdown() -> None:
    """Leave the process group (if one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_SEQUENCE = [0]  # how many exchanges this process has begun (the same count on every rank)


def _arrive(what: str) -> None:
    """Wait for every rank, naming the ones that do not come.

    Each rank first marks its arrival in the process group's store, so that a survivor can say
    which ranks never came (gloo only reports a closed connection); gloo's monitored barrier then
    waits for all of them, at most the process group's timeout.
    """
    _SEQUENCE[0] += 1
    store = _store()
    if store is not None:
        store.set(_key(_SEQUENCE[0], rank()), "1")
    if dist.get_backend() == "gloo":
        _collective(what, dist.monitored_barrier, timeout=_group_timeout(), wait_all_ranks=True)
    else:
        _collective(what, dist.barrier)


def _group_timeout() -> timedelta | None:
    """The default process group's own timeout (monitored_barrier would otherwise wait torch's 30 min)."""
    try:
        return dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # a private accessor: without it the barrier waits torch's default
        return None


def _store():
    """The default process group's key-value store (None where this torch does not expose it)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a private accessor: naming the missing ranks is a courtesy, not a need
        return None


def _key(sequence: int, who: int) -> str:
    return f"adaprune/exchange/{sequence}/{who}"


def _missing_ranks() -> list[int]:
    """The ranks that have not marked their arrival at the current exchange."""
    store = _store()
    if store is None or not _SEQUENCE[0]:
        return []
    try:
        return [r for r in range(world_size()) if not store.check([_key(_SEQUENCE[0], r)])]
    except Exception:  # the store lives on rank 0's host: it may be gone too
        return []


def _collective(what: str, fn, *args, arrived: bool = False, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as error:  # gloo raises DistBackendError (a RuntimeError)
        me = rank()
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        missing = [] if arrived else _missing_ranks()
        if missing:
            other = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never arrived: it"
        else:
            other = "rank 0 (which monitors the others)" if me != 0 else "another rank"
        raise DistributedError(f"Rank {me} of {world_size()} could not exchange {what}: {detail}. "
                               f"{other[0].upper() + other[1:]} died or did not answer within the process group's "
                               "timeout; "
                               "see that rank's own error, and raise the timeout (ADAPRUNE_DIST_TIMEOUT or "
                               "init_process_group(timeout=...)) if it is only slow.") from error
