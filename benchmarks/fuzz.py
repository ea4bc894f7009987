"""The long fuzz campaign: graph k of ``tests/fuzz/graphs.random_spec(k)`` for k in [start, start + n), every
property of ``tests/fuzz/properties.check_graph`` on each, outcomes counted (not stopped at the first failure).

    python benchmarks/fuzz.py --n 1000                   # or: make fuzz
    python benchmarks/fuzz.py --start 1000 --n 500 --backend openvino
    python benchmarks/fuzz.py --seeds 25,99              # re-run single graphs

Prints one line per graph that is not "ok", then counts, SQNR percentiles and the worst graphs; ``--out`` writes
the same as JSON. A failing graph k is reproduced by ``check_graph(random_spec(k))`` and belongs in
``tests/fuzz/test_regressions.py`` (paste ``random_spec(k)``'s repr).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("QCAST_BACKEND", "torch")

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", default="", help="comma-separated graph numbers instead of --start/--n")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-save-load", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from tests.fuzz.graphs import random_spec
    from tests.fuzz.properties import CALIB_SQNR_FLOOR, SQNR_FLOOR, check_graph

    seeds = [int(s) for s in args.seeds.split(",") if s] or list(range(args.start, args.start + args.n))
    counts: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    sqnrs, calib, failures, t0 = [], [], [], time.time()
    for k in seeds:
        spec = random_spec(k)
        try:
            out = check_graph(spec, backend=args.backend, save_load=not args.no_save_load, check_floors=False)
        except Exception as e:  # noqa: BLE001 - counted and reported
            counts["fail"] += 1
            kind = "property" if isinstance(e, AssertionError) else "internal error"
            failures.append({"graph": k, "kind": kind, "error": f"{type(e).__name__}: {e}"[:500], "spec": repr(spec),
                             "where": traceback.format_exc(limit=-3)[-800:]})
            print(f"{k}: FAIL ({kind}) {type(e).__name__}: {str(e)[:300]}\n    {spec!r}", flush=True)
            continue
        counts[out.status] += 1
        if out.status == "qcast_error":
            errors[out.error.split(":")[0]] += 1
            print(f"{k}: {out.error[:160]}", flush=True)
        elif out.sqnr is not None:
            sqnrs.append((out.sqnr, k))
            calib.append((out.calib_sqnr, k))
            if out.sqnr < SQNR_FLOOR or out.calib_sqnr < CALIB_SQNR_FLOOR:
                counts["below_floor"] += 1
                print(f"{k}: output SQNR {out.sqnr:.1f} dB held out, {out.calib_sqnr:.1f} dB on a calibration batch "
                      f"(floors {SQNR_FLOOR}, {CALIB_SQNR_FLOOR})\n    {spec!r}", flush=True)
    elapsed = time.time() - t0
    sqnrs.sort()
    calib.sort()

    def pct(p, values=sqnrs):
        finite = [s for s, _ in values if s != float("inf")]
        return finite[min(len(finite) - 1, int(p / 100 * len(finite)))] if finite else float("nan")

    summary = {"graphs": len(seeds), "backend": args.backend, "seconds": round(elapsed, 1), "counts": dict(counts),
               "qcast_errors": dict(errors), "sqnr_p1_p5_p50": [round(pct(p), 1) for p in (1, 5, 50)],
               "calib_sqnr_p1_p5_p50": [round(pct(p, calib), 1) for p in (1, 5, 50)],
               "worst": [(round(s, 1), k) for s, k in sqnrs[:10]],
               "worst_on_calibration": [(round(s, 1), k) for s, k in calib[:10]], "failures": failures, "floor": SQNR_FLOOR}
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if counts["fail"] or counts["below_floor"] else 0


if __name__ == "__main__":
    sys.exit(main())
