"""The process group qcast runs under: rank, world size and the few collectives it needs (``torch.distributed``).

qcast starts no process group of its own: under ``torchrun`` (or Slurm, or a Kubernetes operator) the user initialises
one (``torch.distributed.init_process_group("gloo")``; NCCL groups work too, tensors go through the CPU, so a gloo group
is the natural one) and every qcast call that reads data becomes a collective: each rank passes its own shard and every
rank gets the same result. Without an initialised group, or with a world of one, every helper here is the identity and
nothing is exchanged.

Errors: a rank that fails inside a collective phase must not leave the others blocked in the next collective, so
qcast's phases end in ``check_ranks(error)``: every rank reports whether it failed and, if any did, every rank raises a
``DistributedError`` naming the failing ranks and their errors.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Iterable, Iterator

import torch

from ..errors import DistributedError


def _dist():
    import torch.distributed as dist
    return dist


def launched_by_torchrun() -> bool:
    """The environment of a ``torchrun`` (torchelastic) worker of a world of two or more."""
    env = os.environ
    return ("TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in env
            and "RANK" in env)


def ensure_group() -> None:
    """Under ``torchrun`` with no process group initialised yet, initialise the default one (gloo, ``env://``), so
    that ``torchrun --nproc_per_node N script.py`` calling ``qcast.quantize`` on each rank's shard is distributed
    without a line of ``torch.distributed`` in the script. ``QCAST_DISTRIBUTED=0`` turns this off (each rank then
    calibrates alone). A group the user initialised is used as it is."""
    dist = _dist()
    if (os.environ.get("QCAST_DISTRIBUTED", "1") != "0" and dist.is_available() and not dist.is_initialized()
            and launched_by_torchrun()):
        dist.init_process_group("gloo")


_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("qcast_distributed_local", default=False)


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this block this rank works alone, as one process (no collective): for work one rank does on behalf of
    the job, such as one candidate of a sensitivity analysis or a step of the accuracy search (``search.split``),
    where a collective calibration would wait forever for ranks busy with other candidates."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def active() -> bool:
    """True inside an initialised process group of two or more ranks (else qcast behaves as one process), outside a
    ``local()`` block."""
    if _LOCAL.get():
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the rank that reports progress and writes files for the job."""
    return rank() == 0


@contextlib.contextmanager
def _lost_peer(what: str) -> Iterator[None]:
    """A collective that fails (gloo: a peer closed the connection, i.e. a rank died or was killed) as a
    ``DistributedError`` saying which rank saw it and what to look at."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: the {what} collective failed, another rank most likely died or was "
            f"killed (see its log; torchrun names the failed rank): {str(e).splitlines()[0] if str(e) else e}") from e


def _cpu_op(t: torch.Tensor, fn) -> torch.Tensor:
    """Run collective ``fn`` on a CPU float64/int64 copy (gloo takes CPU tensors), in place on ``t``'s values."""
    buf = t.detach().clone().cpu()
    with _lost_peer("all-reduce/broadcast"):
        fn(buf)
    t.copy_(buf.to(t.device))
    return t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place: ``op`` in ``"sum"``, ``"min"``, ``"max"`` over every rank; identity on one process."""
    if not active():
        return t
    dist = _dist()
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    return _cpu_op(t, lambda b: dist.all_reduce(b, op=red))


def all_reduce_optional(values: list, op: str = "max") -> list:
    """``op``-reduce a list of optional tensors (None where this rank has no value: a layer its shard never
    reached), element-wise per entry; None stays only where no rank has a value. One collective for the list
    (SmoothQuant's per-channel max |x|). Entries with a value must have the same number of elements on every rank."""
    if not active():
        return values
    widths = all_gather_object([None if v is None else v.numel() for v in values])
    sizes = []
    for j in range(len(values)):
        w = {row[j] for row in widths if row[j] is not None}
        if len(w) > 1:
            raise DistributedError(f"entry {j}: ranks hold {sorted(w)} elements; they must agree")
        sizes.append(w.pop() if w else None)
    live = [j for j, s in enumerate(sizes) if s is not None]
    if not live:
        return values
    fill = {"max": -float("inf"), "min": float("inf"), "sum": 0.0}[op]
    flat = torch.cat([values[j].detach().double().flatten() if values[j] is not None
                      else torch.full((sizes[j],), fill, dtype=torch.float64) for j in live])
    all_reduce(flat, op)
    parts = dict(zip(live, flat.split([sizes[j] for j in live])))
    out = []
    for j, v in enumerate(values):
        if j not in parts:
            out.append(None)
        else:
            like = v if v is not None else None
            t = parts[j].clone()
            out.append(t.to(like.dtype).view(like.shape) if like is not None else t.float())
    return out


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if not active():
        return t
    dist = _dist()
    return _cpu_op(t, lambda b: dist.broadcast(b, src=src))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled by torch.distributed: for small Python values and tensors)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    with _lost_peer("broadcast"):
        _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (one process: ``[obj]``)."""
    if not active():
        return [obj]
    out: list = [None] * world_size()
    with _lost_peer("all-gather"):
        _dist().all_gather_object(out, obj)
    return out


def check_ranks(error: BaseException | None, what: str) -> None:
    """Collective: raise ``DistributedError`` on every rank if any rank passes an error (``what``: the phase, for the
    message). A single process re-raises nothing (its own error propagates as usual)."""
    if not active():
        return
    reports = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise DistributedError(f"{what} failed on rank{'s' if len(failed) > 1 else ''} "
                               f"{', '.join(str(r) for r, _ in failed)} of {world_size()}: {detail}") from error


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run a rank-local phase; on exit every rank learns whether any failed (``check_ranks``). A failure on this rank
    is reported to the others and raised here as a ``DistributedError`` naming it (its own error chained)."""
    if not active():
        yield
        return
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - reported to every rank, then raised
        check_ranks(e, what)
        raise
    check_ranks(None, what)


def decide_on_main(fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` evaluated on rank 0 only and its result broadcast: for decisions that depend on timing
    (``backend="auto"``, the speed check), which would differ from rank to rank. An error on rank 0 fails every rank."""
    if not active():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported to every rank
            error = e
    box = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if box[1] is not None:
        if error is not None:
            raise error
        raise DistributedError(f"rank 0 failed while deciding for every rank: {box[1]}")
    return box[0]


def shard(data: Iterable, rank_: int | None = None, world: int | None = None) -> Iterator:
    """This rank's share of ``data``: items ``rank, rank + world, ...`` (a ``DistributedSampler`` does the same for a
    DataLoader). Every item goes to exactly one rank, so the ranks together see the data once."""
    import itertools
    if rank_ is None or world is None:
        ensure_group()  # under torchrun: this rank's place in the group qcast's calls will use
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return itertools.islice(iter(data), r, None, w)
