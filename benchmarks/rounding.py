"""Weight rounding: round-to-nearest vs AdaRound at 8, 6 and 4 weight bits (output SQNR and time).

For each model: prepare with ``QuantConfig(rounding="adaround")`` and calibrate once (the observers, the bias
correction means and AdaRound's sampled input rows all see the same batches), then convert with every
``(weight_bits, rounding)`` pair and report the output SQNR (dB) against the float model on held-out inputs, and the
time AdaRound took (its per-layer optimisation, in ``convert``). Activations stay 8-bit, bias correction on (the
defaults). Models and data as in ``benchmarks/estimators.py`` (digits CNN and CREPE tiny with real weights; zoo
ResNet-18 / MobileNetV2 with random weights).

    python benchmarks/rounding.py                                    # every model, markdown table
    python benchmarks/rounding.py --models digits --bits 4 --iters 1000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import qcast  # noqa: E402
from benchmarks.estimators import load, sqnr  # noqa: E402

MODELS = ("digits", "crepe", "resnet18", "mobilenet_v2")


def measure(name: str, bits_list, iters: int) -> list[dict]:
    loaded = load(name)
    if loaded is None:
        print(f"{name}: skipped (torchcrepe is not installed)", file=sys.stderr)
        return []
    model, calib, x, metric = loaded
    with torch.no_grad():
        ref = model(x)
    t0 = time.perf_counter()
    plain = qcast.prepare(model, calib[0], qcast.QuantConfig())
    qcast.calibrate(plain, calib, progress=False)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    observed = qcast.prepare(model, calib[0], qcast.QuantConfig(rounding="adaround", adaround_iters=iters))
    qcast.calibrate(observed, calib, progress=False)
    t_rows = time.perf_counter() - t0
    print(f"{name}: prepare+calibrate {t_plain:.1f} s, with AdaRound's row sampling {t_rows:.1f} s", file=sys.stderr)
    rows = []
    for bits in bits_list:
        row = {"model": name, "bits": bits, "calibrate_s": t_plain, "calibrate_rows_s": t_rows, "iters": iters}
        for rounding in ("nearest", "adaround"):
            observed.qcast_config = observed.qcast_config.replace(weight_bits=bits, rounding=rounding)
            t0 = time.perf_counter()
            qmodel = qcast.convert(observed, backend="torch")  # technique studies: one reference executor
            row[f"{rounding}_convert_s"] = time.perf_counter() - t0
            with torch.no_grad():
                row[rounding] = sqnr(ref, qmodel(x))
            if metric:
                row[f"{rounding}_metric"] = metric(qmodel)
            if rounding == "adaround":
                report = observed.qcast_adaround[2]
                row["layers"] = len(report.rows)
                row["kept_nearest"] = sum(r.kept_nearest for r in report.rows)
                row["layer_gain_db"] = [round(r.gain_db, 2) for r in report.rows]
                print(report.table(), file=sys.stderr)
            print(f"{name:<13} {bits} bits {rounding:<8} {row[rounding]:6.2f} dB  convert "
                  f"{row[f'{rounding}_convert_s']:.1f} s  {row.get(f'{rounding}_metric', '')}", file=sys.stderr)
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["| model | weight bits | nearest (dB) | AdaRound (dB) | gain (dB) | AdaRound time (s) | calibrate (s): plain / with rows |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = f" ({r['nearest_metric']} / {r['adaround_metric']})" if "nearest_metric" in r else ""
        lines.append(f"| {r['model']}{extra} | {r['bits']} | {r['nearest']:.1f} | {r['adaround']:.1f} | "
                     f"{r['adaround'] - r['nearest']:+.1f} | {r['adaround_convert_s'] - r['nearest_convert_s']:.0f} | "
                     f"{r['calibrate_s']:.1f} / {r['calibrate_rows_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bits", default="8,6,4")
    ap.add_argument("--iters", type=int, default=qcast.QuantConfig().adaround_iters)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",") if b]
    rows = []
    for name in args.models.split(","):
        if name:
            rows += measure(name, bits, args.iters)
            if args.json:  # after every model: a long run keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)
    print(render(rows))


if __name__ == "__main__":
    main()
