"""Sensitivity and the accuracy-aware search across the ranks of an initialised ``torch.distributed`` process group.

Both cost one evaluation per candidate layer (or per search step), each independent of the others. Under a process
group (``torchrun``, Slurm, ``torch.multiprocessing``), the evaluations are split across the ranks and the results
gathered, so that every rank holds the same numbers as one process that ran them all:

* ``split(n, fn)``: tasks ``0..n-1``, task ``i`` evaluated on rank ``i % world`` by ``fn(i)``; every rank gets every
  result, in task order. Each rank runs the same deterministic code on the same inputs (same candidate order), so
  the assembled result is the one-process result, bit for bit (tests/distributed/test_search.py).
* ``Progress``: a global completion counter in the process group's store, shown by rank 0's tqdm bar.
* Errors never hang the job: a task that raises on one rank is sent to every rank inside the exchange, and every
  rank raises it, naming the rank (the same ``QcastError`` class as one process would raise, e.g. ``EvalError``);
  the other ranks stop at their next task boundary. A rank that dies (or is still running after
  ``QCAST_DIST_TIMEOUT`` seconds, default 1800) makes the exchange fail on the others with a ``DistributedError``
  that names the ranks that did not reach it (arrival marks in the store).

Without an initialised process group of more than one rank, ``world()`` is None and callers run as before.
What travels: per task, the pickled result (a metric: one float, ~30 bytes pickled with its index) and one
store counter increment; details and the arithmetic at 8 and 64 nodes in docs/scale.md.
"""
from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable

from .. import errors
from . import group as rank_group
from ..errors import DistributedError, QcastError

#: seconds a rank waits at an exchange for the others before failing (env QCAST_DIST_TIMEOUT overrides)
DEFAULT_TIMEOUT_S = 1800.0
_PREFIX = "qcast/search"
_GROUPS: dict[tuple, Any] = {}
_SEQ = [0]  # exchanges so far in this process: the same sequence on every rank (they run the same code)


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size``; ``group``: the gloo group qcast exchanges over."""

    rank: int
    size: int
    group: Any
    store: Any

    def __repr__(self) -> str:
        return f"World(rank {self.rank} of {self.size})"


def world() -> World | None:
    """The process group this call runs under, or None (not initialised, a single rank, or inside another rank-local
    task, ``group.local()``): then nothing is split."""
    if rank_group._LOCAL.get():
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    key = (id(dist.group.WORLD), dist.get_world_size())
    group = _GROUPS.get(key)
    if group is not None and not _alive(group):  # the job was torn down and a new one initialised since
        group = None
    if group is None:
        # a gloo group of our own: CPU exchange whatever the default backend (NCCL included), and our own timeout.
        # new_group is collective: every rank reaches this line in the same call (they run the same qcast call)
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s()))
        _GROUPS[key] = group
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store reachable: progress is then local, dead ranks are not named
        store = None
    return World(dist.get_rank(), dist.get_world_size(), group, store)


def _alive(group) -> bool:
    import torch.distributed as dist

    try:
        return group in dist.distributed_c10d._world.pg_map
    except Exception:  # noqa: BLE001 - private registry moved: trust the cached group
        return True


def timeout_s() -> float:
    raw = os.environ.get("QCAST_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise errors.ConfigError(f"QCAST_DIST_TIMEOUT={raw!r}: it must be a number of seconds > 0 (how long a rank "
                                 "waits for the others at an exchange before failing the job)")
    return value


def _next_prefix() -> str:
    _SEQ[0] += 1
    return f"{_PREFIX}/{_SEQ[0]}"


def exchange(w: World, payload: Any, what: str, prefix: str | None = None) -> list[Any]:
    """Every rank's ``payload``, indexed by rank (an all-gather over the gloo group). A rank that died or did not
    arrive in time makes it raise ``DistributedError`` naming that rank."""
    import torch.distributed as dist

    prefix = prefix or _next_prefix()
    if w.store is not None:
        w.store.set(f"{prefix}/arrived/{w.rank}", b"1")
    out: list[Any] = [None] * w.size
    try:
        dist.all_gather_object(out, payload, group=w.group)
    except Exception as e:  # noqa: BLE001 - a peer closed its connection (died) or the timeout passed
        missing = _missing(w, prefix)
        who = (f"rank(s) {missing} of {w.size} did not reach it (the process died or was still running after "
               f"{timeout_s():.0f} s, QCAST_DIST_TIMEOUT)") if missing else \
            f"a peer of rank {w.rank} closed its connection during it (a rank died)"
        raise DistributedError(f"the exchange of results after {what} failed on rank {w.rank}: {who}. "
                               f"Check the log of that rank; {type(e).__name__}: {str(e)[:300]}") from e
    return out


def _missing(w: World, prefix: str) -> list[int]:
    if w.store is None:
        return []
    try:
        return [r for r in range(w.size) if not w.store.check([f"{prefix}/arrived/{r}"])]
    except Exception:  # noqa: BLE001 - the store itself is gone (it lived in the rank that died)
        return []


class Progress:
    """Global completion of a split: ``tick()`` counts one finished task on any rank and returns the job's count
    (from the store); rank 0 shows it on its bar, the other ranks show nothing."""

    def __init__(self, w: World | None, prefix: str, bar):
        self.w, self.key, self.bar, self.done = w, f"{prefix}/done", bar, 0

    def tick(self) -> None:
        self.done += 1
        total = self.done
        if self.w is not None:
            total = self.done * self.w.size  # estimate when there is no store
            if self.w.store is not None:
                try:
                    total = int(self.w.store.add(self.key, 1))
                except Exception:  # noqa: BLE001 - keep the estimate
                    pass
        if self.bar is not None:
            self.bar.n = min(total, self.bar.total or total)
            self.bar.refresh()

    def finish(self, n: int) -> None:
        if self.bar is not None:
            self.bar.n = n if self.bar.total is None else min(n, self.bar.total)
            self.bar.refresh()


def split(n: int, fn: Callable[[int], Any], *, what: str, counts: Callable[[int], bool] | None = None,
          bar=None, signature: Any = None) -> list[Any]:
    """``[fn(0), ..., fn(n-1)]`` on every rank, each task run by one rank (``i % world``), results gathered.

    Without a process group: the plain loop. ``counts(i)``: whether task ``i`` moves ``bar`` (default: all).
    A task that raises fails every rank with an error naming the rank where it raised (see the module docstring).
    ``signature``: what must be equal on every rank (e.g. the candidate names); ranks whose ``(n, signature)``
    differs from rank 0's fail the job with a ``DistributedError`` naming them (different models or arguments).
    """
    w = world()
    progress = Progress(w, _PREFIX + "/local", bar)
    if w is None:
        out = []
        for i in range(n):
            out.append(fn(i))
            if counts is None or counts(i):
                progress.tick()
        return out
    prefix = _next_prefix()
    progress = Progress(w, prefix, bar if w.rank == 0 else None)
    mine: dict[int, Any] = {}
    failure = None
    local_exc: BaseException | None = None
    for i in range(w.rank, n, w.size):
        if _failed_elsewhere(w, prefix):
            break
        try:
            with rank_group.local():  # this rank's task alone: a calibration inside it is not a collective
                mine[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - sent to every rank below, then raised everywhere
            local_exc = e
            failure = (w.rank, type(e).__name__, str(e))
            if w.store is not None:
                try:
                    w.store.set(f"{prefix}/failed", str(w.rank).encode())
                except Exception:  # noqa: BLE001
                    pass
            break
        if counts is None or counts(i):
            progress.tick()
    try:
        blob = pickle.dumps(mine)
    except Exception as e:  # noqa: BLE001 - a result that cannot travel is a bug of the caller, say which
        raise DistributedError(f"rank {w.rank}: the results of {what} cannot be pickled to send to the other ranks: "
                               f"{type(e).__name__}: {e}") from e
    gathered = exchange(w, (failure, blob, (n, signature)), what, prefix)
    failures = [f for f, _, _ in gathered if f is not None]
    if failures:
        _raise(failures, w, what, local_exc)
    odd = [r for r, (_, _, sig) in enumerate(gathered) if sig != gathered[0][2]]
    if odd:
        raise DistributedError(f"during {what}, rank(s) {odd} of {w.size} had other work than rank 0 ({n} tasks here, "
                               f"{gathered[0][2][0]} on rank 0, or other candidates): every rank must call qcast with "
                               "the same model, config and arguments")
    results: dict[int, Any] = {}
    for _, b, _ in gathered:
        results.update(pickle.loads(b))
    progress.finish(sum(1 for i in range(n) if counts is None or counts(i)))
    return [results[i] for i in range(n)]


def _failed_elsewhere(w: World, prefix: str) -> bool:
    if w.store is None:
        return False
    try:
        return bool(w.store.check([f"{prefix}/failed"]))
    except Exception:  # noqa: BLE001
        return False


def _raise(failures: list[tuple[int, str, str]], w: World, what: str, local_exc: BaseException | None):
    rank, cls_name, message = failures[0]
    others = f" (also failed: ranks {[f[0] for f in failures[1:]]})" if len(failures) > 1 else ""
    text = f"rank {rank} of {w.size} failed during {what}{others}: {cls_name}: {message}"
    cls = getattr(errors, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, QcastError)):
        cls = DistributedError
    exc = cls(text)
    if local_exc is not None and failures[0][0] == w.rank:
        raise exc from local_exc
    raise exc


def digest(obj: Any) -> str:
    """A short fingerprint of ``repr(obj)``, for ``split(signature=)``: 16 hex characters on the wire."""
    import hashlib

    return hashlib.blake2b(repr(obj).encode(), digest_size=8).hexdigest()


def payload_bytes(results: list[Any]) -> int:
    """Bytes one split of these results puts on the wire in total (what ``exchange`` pickles), for docs/scale.md."""
    return len(pickle.dumps((None, pickle.dumps(dict(enumerate(results))), (len(results), digest(results)))))
