"""Shared helpers for the qcast benchmarks: threads, timing, fidelity, sizes, model resolution.

Everything here is engine-neutral: a candidate to time is any zero-argument callable, outputs are
torch tensors, numpy arrays or nested tuples/lists/dicts of them.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import io
import math
import os
import random
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

BENCH_THREADS = int(os.environ.get("QCAST_BENCH_THREADS", "2"))
# Must be in the environment before torch / onnxruntime / openvino create their pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(BENCH_THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(BENCH_THREADS)

__all__ = [
    "BENCH_THREADS",
    "set_threads",
    "median_latency_interleaved",
    "latency_stats_interleaved",
    "latency_stats_quiet",
    "ForeignLoad",
    "BUSY_CORES",
    "wait_for_quiet",
    "sqnr",
    "file_size_mb",
    "state_dict_bytes",
    "flatten_outputs",
    "resolve_model",
    "make_input",
    "as_args",
    "machine_info",
]


def set_threads(n: int = BENCH_THREADS) -> None:
    """Pin torch's intra-op pool to ``n`` threads (the benchmark default is 2)."""
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------- timing


def _system_busy_seconds() -> Optional[float]:
    """CPU-seconds all processes have been busy since boot (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        vals = [int(v) for v in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ForeignLoad:
    """Measures how many cores *other* processes kept busy during a block (system busy - our own CPU).

    On a shared 2-core machine another process on one core makes a 2-thread OpenMP pool wait at every
    barrier for a descheduled thread: latencies then jump 10-50x, so timings are only trusted when this
    stays near 0. Use as a context manager; ``.cores`` is the average after the block (NaN when the
    block was shorter than 0.5 s or /proc/stat is unavailable).
    """

    def __enter__(self):
        self._sys0 = _system_busy_seconds()
        self._own0 = time.process_time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sys1, own1, t1 = _system_busy_seconds(), time.process_time(), time.perf_counter()
        wall = t1 - self._t0
        # /proc/stat counts in clock ticks (10 ms): too coarse for windows under half a second.
        if self._sys0 is None or sys1 is None or wall < 0.5:
            self.cores = float("nan")
        else:
            self.cores = max(0.0, ((sys1 - self._sys0) - (own1 - self._own0)) / wall)
        return False


def wait_for_quiet(max_wait_s: float = 0.0, threshold_cores: float = 0.15, window_s: float = 0.5) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold_cores`` for one
    ``window_s`` window; returns the last measured foreign load in cores (0 waits once, no retry)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with ForeignLoad() as fl:
            time.sleep(window_s)
        if not fl.cores > threshold_cores or time.perf_counter() >= deadline:
            return fl.cores


def latency_stats_interleaved(
    fns: Mapping[str, Callable[[], Any]], n: int = 30, warmup: int = 5, seed: int = 0
) -> Dict[str, Dict[str, float]]:
    """Time every candidate ``n`` times, interleaved, and return per-candidate statistics in ms.

    Each iteration runs every candidate once (round-robin, in an order shuffled per iteration with a
    fixed seed), so slow drifts of the machine (thermal, other processes, frequency) hit all candidates
    alike instead of whichever happened to run last. ``warmup`` untimed rounds come first. The garbage
    collector is paused while timing. Returns ``{name: {"median", "p10", "p90", "min", "n",
    "foreign_load"}}``; ``foreign_load`` is the average number of cores other processes kept busy
    during the timed rounds (see :class:`ForeignLoad`; above ~0.2 the figures are not trustworthy).
    """
    names = list(fns)
    samples: Dict[str, List[float]] = {k: [] for k in names}
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    with torch.no_grad():
        for _ in range(warmup):
            for k in names:
                fns[k]()
        gc.collect()
        gc.disable()
        try:
            with ForeignLoad() as fl:
                for _ in range(n):
                    order = names[:]
                    rng.shuffle(order)
                    for k in order:
                        t0 = time.perf_counter_ns()
                        fns[k]()
                        samples[k].append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            if gc_was_enabled:
                gc.enable()
    out = {}
    for k, v in samples.items():
        s = sorted(v)
        out[k] = {
            "median": statistics.median(s),
            "p10": s[max(0, int(0.1 * (len(s) - 1)))],
            "p90": s[int(math.ceil(0.9 * (len(s) - 1)))],
            "min": s[0],
            "n": len(s),
            "foreign_load": fl.cores,
        }
    return out


BUSY_CORES = 0.2  # foreign load (cores) above which a timing block is not trusted


def latency_stats_quiet(
    fns: Mapping[str, Callable[[], Any]],
    n: int = 30,
    warmup: int = 5,
    wait_s: float = 60.0,
    retries: int = 2,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[str, float]]:
    """:func:`latency_stats_interleaved` for a shared machine: wait up to ``wait_s`` for other processes
    to go idle, time, and re-time (up to ``retries`` more times) while other processes kept more than
    ``BUSY_CORES`` busy. Returns the block measured under the least foreign load."""
    best = None
    for attempt in range(retries + 1):
        wait_for_quiet(wait_s)
        stats = latency_stats_interleaved(fns, n=n, warmup=warmup)
        load = next(iter(stats.values()))["foreign_load"]
        if best is None or load < next(iter(best.values()))["foreign_load"]:
            best = stats
        if not load > BUSY_CORES:
            break
        if log is not None and attempt < retries:
            log(f"  other processes used {load:.2f} cores while timing: retrying ({attempt + 1}/{retries})")
    return best


def median_latency_interleaved(
    fns: Mapping[str, Callable[[], Any]], n: int = 30, warmup: int = 5
) -> Dict[str, float]:
    """Median latency in ms of each zero-argument callable, measured interleaved (round-robin)."""
    return {k: v["median"] for k, v in latency_stats_interleaved(fns, n=n, warmup=warmup).items()}


# --------------------------------------------------------------------------------------- fidelity


def flatten_outputs(out: Any) -> List[np.ndarray]:
    """Leaves of a (nested) model output as float64 numpy arrays, in a deterministic order.

    Handles tensors (quantized ones are dequantized), numpy arrays, tuples/lists, dicts/Mappings and
    objects with ``to_tuple()`` (Hugging Face ``ModelOutput``).
    """
    leaves: List[np.ndarray] = []

    def walk(o: Any) -> None:
        if o is None:
            return
        if isinstance(o, torch.Tensor):
            t = o.detach()
            if t.is_quantized:
                t = t.dequantize()
            leaves.append(t.float().cpu().numpy().astype(np.float64))
        elif isinstance(o, np.ndarray):
            leaves.append(o.astype(np.float64))
        elif isinstance(o, Mapping):
            for k in o:
                walk(o[k])
        elif isinstance(o, (tuple, list)):
            for x in o:
                walk(x)
        elif hasattr(o, "to_tuple"):
            walk(o.to_tuple())
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name))
        elif isinstance(o, (int, float)):
            leaves.append(np.asarray(o, dtype=np.float64))
        else:
            raise TypeError(f"cannot compare output leaf of type {type(o).__name__}")

    walk(out)
    return leaves


def _sqnr_array(ref: np.ndarray, out: np.ndarray) -> float:
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs output {out.shape}")
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - out) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr(ref: Any, out: Any, reduce: str = "min") -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB: 10·log10(Σref² / Σ(ref-out)²).

    ``ref``/``out`` may be tensors, arrays or matching nested structures; structured outputs are compared
    leaf by leaf and ``reduce`` picks the reported figure: ``"min"`` (worst leaf, the default),
    ``"mean"``, or ``"all"`` (one SQNR for all leaves concatenated). Higher is better; ~40 dB is about
    1% RMS error; ``inf`` when identical.
    """
    r, o = flatten_outputs(ref), flatten_outputs(out)
    if len(r) != len(o):
        raise ValueError(f"reference has {len(r)} output tensors, output has {len(o)}")
    if not r:
        raise ValueError("no output tensors to compare")
    if reduce == "all":
        return _sqnr_array(np.concatenate([x.ravel() for x in r]), np.concatenate([x.ravel() for x in o]))
    vals = [_sqnr_array(a, b) for a, b in zip(r, o)]
    if reduce == "min":
        return min(vals)
    if reduce == "mean":
        return float(np.mean(vals))
    raise ValueError(f"reduce must be 'min', 'mean' or 'all', not {reduce!r}")


# ------------------------------------------------------------------------------------------ sizes


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (works for FX/eager quantized modules too)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def file_size_mb(model_or_path: Any) -> float:
    """Size in MB (10^6 bytes): a file, a directory (all files in it, recursively), several paths
    (list/tuple, summed), or an ``nn.Module`` (its serialized ``state_dict``)."""
    if isinstance(model_or_path, torch.nn.Module):
        return state_dict_bytes(model_or_path) / 1e6
    if isinstance(model_or_path, (list, tuple)):
        return sum(file_size_mb(p) for p in model_or_path)
    path = os.fspath(model_or_path)
    if os.path.isdir(path):
        total = 0
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total / 1e6
    return os.path.getsize(path) / 1e6


# ------------------------------------------------------------------------------------------ models


def as_args(x: Any) -> Tuple[Any, ...]:
    """One model call's inputs as a positional-args tuple (a tensor becomes a 1-tuple)."""
    if isinstance(x, tuple):
        return x
    if isinstance(x, list):
        return tuple(x)
    return (x,)


def make_input(example_input_fn: Callable[..., Any], batch: int, seed: int) -> Tuple[Any, ...]:
    """Inputs for one call at ``batch``, from a zoo ``example_input_fn``, seeded for reproducibility.

    Tries ``fn(batch, seed=seed)`` (the ``tests.models`` contract), ``fn(batch)``,
    ``fn(batch_size=batch)``, then ``fn()`` concatenated along dim 0 to ``batch``.
    """
    torch.manual_seed(seed)
    for call in (
        lambda: example_input_fn(batch, seed=seed),
        lambda: example_input_fn(batch),
        lambda: example_input_fn(batch_size=batch),
    ):
        try:
            return as_args(call())
        except TypeError:
            continue
    samples = []
    for i in range(batch):
        torch.manual_seed(seed * 1000 + i)
        samples.append(as_args(example_input_fn()))
    return tuple(
        torch.cat([s[j] for s in samples], 0) if isinstance(samples[0][j], torch.Tensor) else samples[0][j]
        for j in range(len(samples[0]))
    )


SOURCES = ("auto", "full", "zoo", "standin")


def resolve_model(name: str, source: str = "auto"):
    """Return ``(factory, example_input_fn, source)`` for a model name.

    ``source``: ``"full"`` (``tests.models.FULL``: real-size architectures at native resolution),
    ``"zoo"`` (``tests.models.ZOO``: the test-suite's shrunken configurations), ``"standin"``
    (``benchmarks.standin_models.ZOO``), or ``"auto"``: the first of full, zoo, standin that has it.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")
    errors = []
    for reg in ("full", "zoo"):
        if source not in ("auto", reg):
            continue
        try:
            table = getattr(importlib.import_module("tests.models"), reg.upper())
            if name in table:
                factory, input_fn = table[name][:2]
                return factory, input_fn, reg
            errors.append(f"tests.models.{reg.upper()} has no {name!r} (has: {', '.join(sorted(table))})")
        except Exception as e:  # missing module, or registry not defined yet
            errors.append(f"tests.models.{reg.upper()} unavailable ({type(e).__name__}: {e})")
    if source in ("full", "zoo"):
        raise KeyError("; ".join(errors))
    from benchmarks.standin_models import ZOO as STANDIN

    if name in STANDIN:
        factory, input_fn = STANDIN[name]
        return factory, input_fn, "standin"
    errors.append(f"stand-in zoo has no {name!r} (has: {', '.join(sorted(STANDIN))})")
    raise KeyError("; ".join(errors))


def build_model(name: str, source: str = "auto", seed: int = 0):
    """Construct a model in eval mode with a fixed seed; returns ``(model, input_fn, source)``."""
    factory, input_fn, src = resolve_model(name, source)
    torch.manual_seed(seed)
    model = factory().eval()
    return model, input_fn, src


def randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> bool:
    """Apply ``tests.models.randomize_bn_stats`` (realistic random BN affine/running stats) when
    available; returns whether it was applied."""
    try:
        fn = importlib.import_module("tests.models").randomize_bn_stats
    except Exception:
        return False
    fn(model, seed=seed)
    return True


def bn_warmup(model: torch.nn.Module, inputs: Sequence[Tuple[Any, ...]]) -> None:
    """Give BatchNorm layers data-derived running statistics (cumulative average over ``inputs``).

    Randomly initialised models have BN running stats of mean 0 / var 1, which make activations grow
    layer after layer; a trained model's BN normalises them. This makes random-weight fidelity figures
    closer to a trained model's. Mutates ``model`` (the benchmark's own copy) and leaves it in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(*x)
    for m, mom in saved:
        m.momentum = mom
    model.eval()


def machine_info() -> Dict[str, str]:
    """CPU model, core count, torch version and the thread setting, for the report header."""
    cpu = "unknown CPU"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    fl = line.split(":", 1)[1].split()
                    flags = ",".join(x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if x in fl)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": flags,
        "cores": str(os.cpu_count()),
        "threads": str(BENCH_THREADS),
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------
# docs/benchmarks.md is shared by several scripts: each owns one marked section
# ------------------------------------------------------------------------------------------------
def _section_re(name: str):
    import re

    return re.compile(rf"<!-- section:{re.escape(name)} -->.*?<!-- /section:{re.escape(name)} -->\n?", re.S)


def sections_of(path: str) -> str:
    """The marked sections (``<!-- section:NAME -->`` ... ``<!-- /section:NAME -->``) of an existing page, in order."""
    import re

    if not os.path.exists(path):
        return ""
    text = open(path).read()
    return "".join(m.group(0) for m in re.finditer(r"<!-- section:(\S+) -->.*?<!-- /section:\1 -->\n?", text, re.S))


def write_page(path: str, md: str) -> None:
    """Write the page body ``md`` to ``path``, keeping the sections other scripts wrote there."""
    kept = sections_of(path)
    with open(path, "w") as f:
        f.write(md.rstrip("\n") + "\n" + ("\n" + kept if kept else ""))


def write_section(path: str, name: str, md: str) -> None:
    """Replace (or append) section ``name`` of the page at ``path`` with ``md``."""
    block = f"<!-- section:{name} -->\n{md.rstrip()}\n<!-- /section:{name} -->\n"
    text = open(path).read() if os.path.exists(path) else ""
    pattern = _section_re(name)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
