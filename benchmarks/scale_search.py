"""Wall time of qcast.sensitivity and the accuracy-aware search with 1, 2 and 3 processes (torch.distributed, gloo).

    python benchmarks/scale_search.py                       # 3 interleaved rounds of 1, 2, 3 processes
    python benchmarks/scale_search.py --reps 1 --worlds 1,2 --val-batches 8

The model: a 24-layer MLP (width 128, ReLU; 24 int8 candidate layers) in which layers 6 and 15 read a feature with
bias +1000 that they ignore, so that they must stay float: the search has something to find. ``eval_fn`` is minus
the relative L2 error of the output against the float model on ``--val-batches`` held-out batches (the validation
pass; it dominates, as an ImageNet pass does). Calibration: ``--calib`` batches, the same on every rank.

Each world size runs in fresh processes, one torch thread each (``torch.multiprocessing``, spawn, FileStore
rendezvous); 1 process runs without any process group (the one-process path). Timed on rank 0 between barriers
(imports and the rendezvous excluded): ``qcast.sensitivity(model, data, metric=eval_fn)`` and
``qcast.quantize(model, data, eval_fn=, max_drop=)``. The world sizes are interleaved (each round runs them in
a shuffled order) and the machine's load (``uptime``) is recorded before and after each run, with the CPU
seconds of each rank (the busiest rank's CPU time is the wall time the job would take with a free core per rank).
Each process starts a session of its own (``os.setsid``): Linux's autogroup scheduler shares a loaded CPU between
sessions, so ranks left in one session split one slice and show no speed-up whatever the code does
(``--same-session`` to see that). Every run's ranking
and chosen float layers are compared with the one-process run; the bytes each rank sent in qcast's exchanges are
counted (pickled payloads of ``qcast.distributed.search.exchange``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("QCAST_BACKEND", "torch")
if __package__ in (None, ""):  # allow `python benchmarks/scale_search.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from tests.models.planted import PlantedMLP  # noqa: E402

DEPTH, WIDTH, BATCH = 24, 128, 64


def build(calib: int, val: int):
    torch.manual_seed(0)
    model = PlantedMLP(DEPTH, WIDTH).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(BATCH, WIDTH, generator=g) for _ in range(calib)]
    held = [torch.randn(BATCH, WIDTH, generator=g) for _ in range(val)]
    with torch.no_grad():
        refs = [model(x) for x in held]

    @torch.no_grad()
    def eval_fn(m):
        num = sum((r - m(x)).pow(2).sum() for r, x in zip(refs, held))
        den = sum(r.pow(2).sum() for r in refs)
        return -float((num / den).sqrt())
    return model, data, eval_fn


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def worker(rank: int, world: int, tmp: str, args: dict) -> None:
    if args["own_session"]:
        # Linux autogroup: the scheduler shares the CPU between sessions, not processes, so under load the ranks of
        # one session share one slice and cannot run in parallel. A rank of a real job has its own cores (its own
        # node, or its own slice): each process, the 1-process run included, gets a session of its own
        os.setsid()
    torch.set_num_threads(1)
    import torch.distributed as dist

    import qcast
    from qcast.distributed import search

    sent = [0]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
        real = search.exchange

        def counting(w, payload, what, prefix=None):
            sent[0] += len(pickle.dumps(payload))
            return real(w, payload, what, prefix)
        search.exchange = counting

    def barrier():
        if world > 1:
            dist.barrier()

    model, data, eval_fn = build(args["calib"], args["val"])
    cfg = qcast.QuantConfig(calibration=args["calibration"])
    barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    report = qcast.sensitivity(model, data, metric=eval_fn, config=cfg, progress=False, cache=False)
    barrier()
    t1, c1 = time.perf_counter(), time.process_time()
    sens_bytes = sent[0]
    qmodel = qcast.quantize(model, data, config=cfg, eval_fn=eval_fn, max_drop=args["max_drop"], progress=False,
                            check_speed=False)
    barrier()
    t2, c2 = time.perf_counter(), time.process_time()
    with open(f"{tmp}/cpu{rank}.json", "w") as f:
        json.dump([c1 - c0, c2 - c1], f)
    s = qmodel.qcast_meta["accuracy_search"]
    if rank == 0:
        out = {"world": world, "sensitivity_s": t1 - t0, "search_s": t2 - t1, "candidates": len(report.rows),
               "rows": [(r.name, r.value) for r in report.rows], "ranking": list(s.ranking),
               "steps": len(s.steps), "float_layers": list(s.float_layers), "met": s.met,
               "sens_bytes_rank0": sens_bytes, "search_bytes_rank0": sent[0] - sens_bytes}
        with open(f"{tmp}/result.json", "w") as f:
            json.dump(out, f)
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        before = uptime()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, world, tmp, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"world {world}: a rank failed (exit codes {[p.exitcode for p in procs]})")
        with open(f"{tmp}/result.json") as f:
            out = json.load(f)
        out["load_before"], out["load_after"] = before, uptime()
        cpu = []
        for r in range(world):
            with open(f"{tmp}/cpu{r}.json") as f:
                cpu.append(json.load(f))
        out["cpu_sensitivity_s"] = [c[0] for c in cpu]  # CPU seconds of each rank
        out["cpu_search_s"] = [c[1] for c in cpu]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--val", type=int, default=128, help="held-out batches of 64 rows that eval_fn runs")
    ap.add_argument("--max-drop", type=float, default=0.05)
    ap.add_argument("--calibration", default="minmax")
    ap.add_argument("--json", default=None, help="write every run here")
    ap.add_argument("--same-session", action="store_true",
                    help="keep every process in this session (on a loaded machine the ranks then share one CPU slice)")
    a = ap.parse_args()
    args = {"calib": a.calib, "val": a.val, "max_drop": a.max_drop, "calibration": a.calibration,
            "own_session": not a.same_session}
    worlds = [int(w) for w in a.worlds.split(",")]
    runs: list[dict] = []
    rng = random.Random(0)
    print(f"# {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {uptime()}", flush=True)
    for rep in range(a.reps):
        order = worlds[:]
        rng.shuffle(order)
        for w in order:
            r = run_world(w, args)
            r["rep"] = rep
            runs.append(r)
            print(f"rep {rep} world {w}: sensitivity {r['sensitivity_s']:.2f} s (CPU s per rank "
                  f"{[round(c, 2) for c in r['cpu_sensitivity_s']]}), search {r['search_s']:.2f} s (CPU s per rank "
                  f"{[round(c, 2) for c in r['cpu_search_s']]}) "
                  f"({r['steps']} steps, float {r['float_layers']}), load {r['load_before']} -> {r['load_after']}",
                  flush=True)
    ref = {r["rep"]: r for r in runs if r["world"] == 1}
    one = [r for r in runs if r["world"] == 1]
    print("\n| processes | sensitivity (s, median) | ratio vs 1 | accuracy search (s, median) | ratio vs 1 | "
          "busiest rank's CPU s, sensitivity / search (ratio vs 1) | "
          "same ranking + float layers as 1 process | bytes sent by rank 0 (sensitivity / search) |")
    print("|---|---|---|---|---|---|---|---|")
    cpu1 = (statistics.median(max(r["cpu_sensitivity_s"]) for r in one),
            statistics.median(max(r["cpu_search_s"]) for r in one)) if one else None
    base = one[0] if one else None
    for w in worlds:
        rs = [r for r in runs if r["world"] == w]
        sens = statistics.median(r["sensitivity_s"] for r in rs)
        srch = statistics.median(r["search_s"] for r in rs)
        if one:
            s1 = statistics.median(r["sensitivity_s"] for r in one)
            q1 = statistics.median(r["search_s"] for r in one)
            ratios = (f"{sens / s1:.2f}x", f"{srch / q1:.2f}x")
            same = all(r["rows"] == base["rows"] and r["ranking"] == base["ranking"]
                       and r["float_layers"] == base["float_layers"] for r in rs)
        else:
            ratios, same = ("-", "-"), "-"
        cs = statistics.median(max(r["cpu_sensitivity_s"]) for r in rs)
        cq = statistics.median(max(r["cpu_search_s"]) for r in rs)
        cpu = f"{cs:.2f} / {cq:.2f}" + (f" ({cs / cpu1[0]:.2f}x / {cq / cpu1[1]:.2f}x)" if cpu1 else "")
        print(f"| {w} | {sens:.2f} | {ratios[0]} | {srch:.2f} | {ratios[1]} | {cpu} | {same} | "
              f"{rs[0]['sens_bytes_rank0']} / {rs[0]['search_bytes_rank0']} |")
    if one:
        print(f"\ncandidates: {base['candidates']}; search: {base['steps']} steps, float layers {base['float_layers']}"
              f" (met: {base['met']}); per-round ratios (sensitivity, search) vs the same round's 1 process:")
        for w in worlds[1:] if worlds[0] == 1 else worlds:
            per = [(r["sensitivity_s"] / ref[r["rep"]]["sensitivity_s"], r["search_s"] / ref[r["rep"]]["search_s"])
                   for r in runs if r["world"] == w and r["rep"] in ref]
            print(f"  {w} processes: " + ", ".join(f"({x:.2f}, {y:.2f})" for x, y in per))
    print(f"load at the end: {uptime()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
