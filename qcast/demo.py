"""`qcast demo` / `make demo`: train the bundled digits CNN, quantize it, and show what happened."""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch


def _interleaved_ms(fns: dict, x, n: int = 30, warmup: int = 5) -> dict[str, float]:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f(x)
        for _ in range(n):
            for k, f in fns.items():
                t = time.perf_counter()
                f(x)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def run_demo(out: str | None = None) -> int:
    import qcast
    from .demo_data import accuracy, calibration_batches, load_digits_split, train_digits_cnn

    print("qcast demo: a CNN trained here on scikit-learn's handwritten digits, quantized to int8\n")
    t = time.perf_counter()
    data = load_digits_split(seed=0)
    x_train, _, x_test, y_test = data
    model = train_digits_cnn(seed=0, data=data, progress=lambda e, n, loss: print(f"  train epoch {e}/{n}  loss {loss:.3f}"))
    print(f"  trained in {time.perf_counter() - t:.1f}s\n")

    t = time.perf_counter()
    qmodel = qcast.quantize(model, calibration_batches(x_train, batch_size=32, num_batches=16))
    t_quant = time.perf_counter() - t
    summary = qmodel.qcast_meta["calibration_summary"]
    print(f"quantized in {t_quant:.1f}s from {summary.batches} calibration batches; ranges seen:")
    print("  " + summary.table(limit=6).replace("\n", "\n  "))
    choice = qmodel.qcast_meta.get("backend_choice")
    if choice:  # backend="auto": what each installed backend measured on the first calibration batch
        tried = "; ".join(f"{c['backend']} {c['ms']:.3f} ms" if not c["rejected"] else f"{c['backend']} rejected "
                          f"({c['rejected'][:60]})" for c in choice["candidates"])
        print(f"\nbackend: {qmodel.qcast_meta['backend']} (backend='auto', fastest of: {tried}, on {choice['input']})")

    with tempfile.TemporaryDirectory() as d:
        fpath, qpath = os.path.join(d, "float.pt"), out or os.path.join(d, "digits.qcast")
        torch.save(model.state_dict(), fpath)
        qcast.save(qmodel, qpath)
        fsize, qsize = os.path.getsize(fpath), os.path.getsize(qpath)
        reloaded = qcast.load(qpath)

    acc_f, acc_q = accuracy(model, x_test, y_test), accuracy(reloaded, x_test, y_test)
    report = qcast.compare(model, qmodel, [x_test[i:i + 64] for i in range(0, 192, 64)])
    with torch.no_grad():
        agree = float((model(x_test).argmax(1) == qmodel(x_test).argmax(1)).float().mean())
    print("\nfidelity on the held-out test set:")
    print(f"  accuracy  float {100 * acc_f:.2f}%   int8 {100 * acc_q:.2f}%   (delta {100 * (acc_q - acc_f):+.2f} pp)")
    print(f"  top-1 agreement int8 vs float {100 * agree:.2f}%   output SQNR {report.output_sqnr:.1f} dB")
    print(f"\nsize: float state_dict {fsize / 1e3:.1f} kB -> int8 file {qsize / 1e3:.1f} kB ({qsize / fsize:.2f}x)")
    threads = torch.get_num_threads()
    print(f"latency (median of interleaved runs, {threads} threads):")
    for bs in (1, 64):
        ms = _interleaved_ms({"float": model, "int8": qmodel}, x_test[:bs])
        print(f"  batch {bs:>3}: float {ms['float']:.3f} ms   int8 {ms['int8']:.3f} ms   ({ms['float'] / ms['int8']:.2f}x)")
    print("\nper-op table (qcast.explain):")
    rows = qcast.explain(qmodel)
    w = max(len(r.name) for r in rows)
    for r in rows:
        print(f"  {r.name:<{w}}  {r.op:<18} {r.precision:<5} {r.engine:<10} {r.reason}")
    print("\nworst layers by SQNR (qcast.compare):")
    print("  " + report.table(limit=5).replace("\n", "\n  "))
    if out:
        print(f"\nsaved the int8 model to {out}")
    return 0
