"""Time of one QAT training step (qcast.prepare_qat) against one float training step of the same model.

    python benchmarks/qat_step.py --models digits_cnn,resnet18 --batch 32 --n 30

A step is forward + cross-entropy + backward + SGD update, on ``QCAST_BENCH_THREADS`` (default 2) threads. The
float and QAT models are timed interleaved (one step of each per round, ``--warmup`` rounds first), medians of
``--n`` rounds; the ratio is QAT / float (target: <= 1.5 on CPU, issue 12). Variants: int8 weights (default
scheme), int4 weights, LSQ (learned scales). Models: ``digits_cnn`` (the test-suite's CNN, 8x8 inputs) and
``cifar_cnn`` (a VGG-style CNN on 32x32 RGB, 5 conv+BN+relu) and ``tests.models.ZOO`` entries with image inputs. Results go to stdout and, with ``--out``, a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qcast  # noqa: E402


def _model(name: str, batch: int):
    if name == "digits_cnn":
        from tests.test_qat import DigitsCNN
        return DigitsCNN().eval(), torch.rand(batch, 1, 8, 8), 10
    if name == "cifar_cnn":  # a VGG-style CNN on 32x32 RGB: convs dominate the step, as in real training
        layers, c = [], 3
        for w in (32, 32, "M", 64, 64, "M", 128, "M"):
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))
        return model.eval(), torch.rand(batch, 3, 32, 32), 10
    from tests.models import ZOO
    factory, example = ZOO[name]
    model = factory().eval()
    x = example(torch.Generator().manual_seed(0))
    x = x[0] if isinstance(x, (tuple, list)) else x
    x = x[:1].expand(batch, *x.shape[1:]).clone()
    with torch.no_grad():
        classes = model(x).shape[-1]
    return model, x, classes


def _step(model, opt, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench(name: str, batch: int, n: int, warmup: int, observe: bool = False, compile: bool = False) -> list[dict]:
    import copy
    model, x, classes = _model(name, batch)
    y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(0))
    variants = {"int8": dict(config=qcast.QuantConfig()), "int4": dict(config=qcast.QuantConfig(weight="int4")),
                "int8 LSQ": dict(config=qcast.QuantConfig(), learnable_scales=True)}
    rows = []
    for label, kw in variants.items():
        fm = copy.deepcopy(model).train()
        # observers frozen after the warm-up rounds (``--observe``: never), BatchNorm statistics never: the
        # steady state of a QAT run, which trains with batch statistics for most of its steps
        qm = qcast.prepare_qat(model, x, kw["config"], learnable_scales=kw.get("learnable_scales", False),
                               freeze_observers_after=None if observe else warmup)
        fo = torch.optim.SGD(fm.parameters(), lr=1e-4)
        qo = torch.optim.SGD([p for p in qm.parameters() if p.requires_grad], lr=1e-4)
        if compile:  # both compiled (inductor): the warm-up rounds compile, and recompile once when observers freeze
            fm, qm = torch.compile(fm), torch.compile(qm)
        times = {"float": [], "qat": []}
        for i in range(warmup + n):
            for key, m, o in (("float", fm, fo), ("qat", qm, qo)):
                t = time.perf_counter()
                _step(m, o, x, y)
                if i >= warmup:
                    times[key].append(time.perf_counter() - t)
        f, q = statistics.median(times["float"]), statistics.median(times["qat"])
        rows.append({"model": name, "batch": batch, "variant": label, "observing": observe, "compiled": compile,
                     "float_ms": f * 1e3, "qat_ms": q * 1e3,
                     "ratio": q / f})
        print(f"{name:>12} b{batch} {label:>9}{' compiled' if compile else ''}: float {f * 1e3:7.2f} ms  qat {q * 1e3:7.2f} ms  ratio {q / f:.2f}x",
              flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits_cnn")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--observe", action="store_true", help="keep the activation observers running every step")
    ap.add_argument("--compile", action="store_true", help="torch.compile both the float and the QAT model")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("QCAST_BENCH_THREADS", "2")))
    rows = [r for name in args.models.split(",") for r in bench(name, args.batch, args.n, args.warmup, args.observe,
                                                             args.compile)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
