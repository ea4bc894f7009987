"""Calibration at scale (issue 14): bounded memory, throughput over 1-3 processes, quantize's peak RSS on a
synthetic transformer of a few hundred million parameters. Results go to docs/scale.md ("Calibration").

    python benchmarks/scale_calibration.py --study memory       # 1x / 10x / 100x the default batch count
    python benchmarks/scale_calibration.py --study throughput   # 1, 2, 3 gloo processes, same global data
    python benchmarks/scale_calibration.py --study transformer  # peak RSS of quantize, ~300 M parameters
    python benchmarks/scale_calibration.py --study all

Each measurement runs in a fresh subprocess (peak RSS, ``ru_maxrss``, is per process). Torch runs on
``QCAST_BENCH_THREADS`` (default 1) threads per process; the machine is shared, so ``uptime`` is printed with the
figures. The calibration data is a generator producing each batch on the fly: nothing but the batch in flight and
the calibration state is alive, whatever the count.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: qcast's documented default calibration size ("8-32 representative batches"): the low end
DEFAULT_BATCHES = 8
#: batches of the throughput study: large enough (~10-20 ms of forward each) that the work, not the per-batch
#: Python overhead, is what the processes share
TP_SHAPE = (8, 3, 64, 64)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cnn():
    import torch.nn as nn
    import torch
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def _batches(n: int, seed: int = 0, shape=(2, 3, 16, 16)):
    import torch
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        yield torch.randn(*shape, generator=g) * (1 + (i % 7) * 0.3)


# ------------------------------------------------------------------------------------------------
# memory: state and peak RSS at 1x, 10x, 100x the default batch count
# ------------------------------------------------------------------------------------------------
def child_memory(n: int, estimator: str) -> dict:
    import torch
    import qcast
    model = _cnn()
    observed = qcast.prepare(model, next(_batches(1)), qcast.QuantConfig(calibration=estimator, backend="torch"))
    import tracemalloc
    base = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    qcast.calibrate(observed, _batches(n), progress=False)
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    state = observed.calibration_state()
    return {"batches": n, "estimator": estimator, "state_bytes": state.nbytes, "python_peak_kib": py_peak / 1024,
            "rss_before_mib": base, "peak_rss_mib": _peak_mib(), "seconds": seconds, "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------
# throughput: the same global data over 1, 2, 3 processes
# ------------------------------------------------------------------------------------------------
def _tp_worker(rank: int, world: int, init: str, n: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import qcast
    torch.set_num_threads(int(os.environ.get("QCAST_BENCH_THREADS", "1")))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = _cnn()
    observed = qcast.prepare(model, next(_batches(1)), qcast.QuantConfig(backend="torch"))
    data = list(qcast.distributed.shard(_batches(n, shape=TP_SHAPE), rank, world))
    dist.barrier()
    t0 = time.perf_counter()
    qcast.calibrate(observed, data, progress=False)
    dist.barrier()
    seconds = time.perf_counter() - t0
    # the reduction alone: what the ranks exchange, timed on its own
    from qcast.distributed.calibration import reduce_observed
    t1 = time.perf_counter()
    reduce_observed(observed, carried=False)
    dist.barrier()
    reduce_s = time.perf_counter() - t1
    qp = [o.qparams() for _, o in observed.observers()]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "batches": n, "seconds": seconds, "batches_per_s": n / seconds,
                       "reduce_s": reduce_s, "qparams": [repr(q) for q in qp]}, f)
    dist.destroy_process_group()


def child_throughput(world: int, n: int) -> dict:
    import tempfile
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        if world == 1:
            import torch
            import qcast
            torch.set_num_threads(int(os.environ.get("QCAST_BENCH_THREADS", "1")))
            observed = qcast.prepare(_cnn(), next(_batches(1)), qcast.QuantConfig(backend="torch"))
            data = list(_batches(n, shape=TP_SHAPE))
            t0 = time.perf_counter()
            qcast.calibrate(observed, data, progress=False)
            s = time.perf_counter() - t0
            return {"world": 1, "batches": n, "seconds": s, "batches_per_s": n / s, "reduce_s": 0.0,
                    "qparams": [repr(o.qparams()) for _, o in observed.observers()]}
        mp.spawn(_tp_worker, args=(world, f"file://{d}/pg", n, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------
# transformer: peak RSS of quantize (backend="torch") on ~300 M parameters
# ------------------------------------------------------------------------------------------------
def _transformer(d: int, layers: int, ff: int):
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)
            self.heads = d // 64

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (m(h).view(b, t, self.heads, 64).transpose(1, 2) for m in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.head = nn.Linear(d, d)

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            return self.head(x)

    torch.manual_seed(0)
    return Net().eval()


def child_transformer(d: int, layers: int, ff: int, tokens: int, n: int) -> dict:
    import torch
    import qcast
    torch.set_num_threads(int(os.environ.get("QCAST_BENCH_THREADS", "1")))
    base = _rss_mib()
    model = _transformer(d, layers, ff)
    params = sum(p.numel() for p in model.parameters())
    float_mib = sum(p.numel() * p.element_size() for p in model.state_dict().values()) / 2**20
    largest_mib = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)) / 2**20
    after_model = _rss_mib()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(1, tokens, d, generator=g) for _ in range(n))
    import threading
    phases, stop = [], threading.Event()

    def sample():  # RSS every 50 ms: where in quantize the peak is
        while not stop.is_set():
            phases.append((time.perf_counter(), _rss_mib()))
            time.sleep(0.05)

    import qcast.api as api
    marks = {}
    for name in ("prepare", "calibrate", "convert"):
        real = getattr(api, name)

        def wrapped(*a, _real=real, _name=name, **k):
            marks[_name + "_start"] = time.perf_counter()
            out = _real(*a, **k)
            marks[_name + "_end"] = time.perf_counter()
            return out
        setattr(api, name, wrapped)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    qmodel = qcast.quantize(model, data, backend="torch", progress=False, check_speed=False)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    peaks = {}
    for ph in ("prepare", "calibrate", "convert"):
        lo, hi = marks.get(ph + "_start", 0), marks.get(ph + "_end", 0)
        inside = [r for t, r in phases if lo <= t <= hi]
        peaks[ph + "_peak_rss_mib"] = max(inside) if inside else None
    int8_mib = sum(t.numel() * t.element_size() for t in _tensors(qmodel)) / 2**20
    return {"params_M": params / 1e6, "float_mib": float_mib, "int8_model_mib": int8_mib, "largest_layer_mib": largest_mib,
            "rss_start_mib": base, "rss_after_model_mib": after_model, "rss_end_mib": _rss_mib(),
            "peak_rss_mib": _peak_mib(), "quantize_s": seconds, "tokens": tokens, "batches": n,
            "peak_over_float_plus_int8_mib": _peak_mib() - base - float_mib - int8_mib, **peaks}


def _tensors(qmodel):
    """Every distinct tensor the QuantizedModel holds (int8 weights of the lowered graph and the QDQ graph's)."""
    import torch
    seen, out = set(), []
    for mod in qmodel.modules():
        for v in list(vars(mod).values()) + list(mod._parameters.values()) + list(mod._buffers.values()):
            ts = []
            if isinstance(v, torch.Tensor):
                ts = [v]
            elif hasattr(v, "unpack"):  # packed quantized params
                try:
                    w = v.unpack()
                    ts = [t for t in (w if isinstance(w, tuple) else (w,)) if isinstance(t, torch.Tensor)]
                except Exception:  # noqa: BLE001
                    ts = []
            for t in ts:
                key = t.data_ptr() if not t.is_quantized else id(t)
                if key not in seen:
                    seen.add(key)
                    out.append(t)
    return out


# ------------------------------------------------------------------------------------------------
def _run_child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so RSS would count memory already
    # freed; a fixed 1 MiB threshold returns every large tensor to the OS when freed: RSS then tracks live memory
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="all")
    ap.add_argument("--child", nargs="*")
    ap.add_argument("--batches", type=int, default=48, help="global batch count of the throughput study")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--ff", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "memory":
            r = child_memory(int(rest[0]), rest[1])
        elif kind == "throughput":
            r = child_throughput(int(rest[0]), int(rest[1]))
        else:
            r = child_transformer(*map(int, rest))
        print(json.dumps(r))
        return
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    studies = ["memory", "throughput", "transformer"] if a.study == "all" else a.study.split(",")
    if "memory" in studies:
        print("| estimator | batches | state bytes | Python peak KiB | peak RSS MiB | s |\n|---|---|---|---|---|---|")
        for est in ("mse", "kl"):
            for mult in (1, 10, 100):
                r = _run_child(["memory", str(DEFAULT_BATCHES * mult), est])
                print(f"| {est} | {r['batches']} | {r['state_bytes']} | {r['python_peak_kib']:.0f} | "
                      f"{r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |", flush=True)
    if "throughput" in studies:
        print("| processes | batches | wall s | batches/s | reduction s | qparams = 1 process |\n|---|---|---|---|---|---|")
        ref = None
        for world in (1, 2, 3):
            r = _run_child(["throughput", str(world), str(a.batches)])
            ref = ref or r["qparams"]
            print(f"| {world} | {r['batches']} | {r['seconds']:.2f} | {r['batches_per_s']:.1f} | {r['reduce_s']:.3f} | "
                  f"{r['qparams'] == ref} |", flush=True)
    if "transformer" in studies:
        r = _run_child(["transformer", str(a.d), str(a.layers), str(a.ff), str(a.tokens), "4"])
        print(json.dumps(r, indent=1))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
