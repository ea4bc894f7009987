"""int4 weights on scikit-learn's digits: float vs int4 PTQ (nearest, AdaRound) vs int4 QAT, over CNN shapes and seeds.

    python benchmarks/qat_vs_ptq.py --settings narrow4x4,ds8x3 --seeds 0,1,2

For each setting and seed: a CNN is trained in float (Adam, lr 1e-2, ``--float-epochs``), quantized with int4
per-channel weights post-training (``rounding="nearest"`` and ``"adaround"``, 1000 iterations, 512 calibration
images), and fine-tuned with ``qcast.prepare_qat`` (``--qat-epochs`` epochs, Adam at ``--qat-lr``, BatchNorm and
observers frozen after ``--freeze`` steps, LSQ with ``--lsq``) then converted. ``float+ft`` is the float model
fine-tuned for the same epochs at the same learning rate without quantization: what the extra epochs alone give
(``--ptq-finetuned``: and ``nearest(ft)`` / ``adaround(ft)``, int4 PTQ of that model: PTQ with QAT's training budget).
Each column is held-out accuracy / cross-entropy (1400 train / 397 held-out images, the split of
``tests/test_qat.py``; ``--train 1000``: 1000 / 797). One thread; a run takes 10-80 s per seed.

Settings: ``digits`` (the test suite's CNN: 2 conv+BN+relu of 6/8 channels), ``narrow4x4`` (4 conv+BN+relu of 4
channels), ``deep4x6`` (6 of 4 channels), ``ds8x3`` (a depthwise-separable CNN, 8 channels, 3 blocks); suffix
``:sym`` / ``:pow2`` for ``activation="int8_sym"`` / ``"pow2"``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qcast  # noqa: E402
from tests.test_qat import Digits, DigitsCNN  # noqa: E402


class PlainCNN(nn.Module):
    """``len(widths)`` conv+BN+relu layers, 2x2 max-pooling after the layers in ``pool_after``, a linear head."""

    def __init__(self, widths=(4, 4, 4, 4), pool_after=(1, 3)):
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        side = 8 // (2 ** len(pool_after))
        self.fc = nn.Linear(c * side * side, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class DepthwiseCNN(nn.Module):
    """A stem conv, then ``blocks`` of depthwise 3x3 + pointwise 1x1 (each with BN and relu), a linear head."""

    def __init__(self, c=8, blocks=3):
        super().__init__()
        layers = [nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        for i in range(blocks):
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * (8 // 2 ** min(blocks, 2)) ** 2, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


MODELS = {"digits": DigitsCNN, "narrow4x4": lambda: PlainCNN((4,) * 4), "deep4x6": lambda: PlainCNN((4,) * 6),
          "ds8x3": lambda: DepthwiseCNN(8, 3)}
ACTIVATIONS = {"": "auto", "sym": "int8_sym", "pow2": "pow2"}


def run(d: Digits, setting: str, seed: int, args) -> dict:
    name, _, act = setting.partition(":")
    config = qcast.QuantConfig(weight="int4", activation=ACTIVATIONS[act], backend="torch")
    t = time.perf_counter()
    torch.manual_seed(seed)
    fm = d.train(MODELS[name](), epochs=args.float_epochs, lr=1e-2).eval()
    row = {"setting": setting, "seed": seed, "float": d.evaluate(fm)}
    ft = d.train(copy.deepcopy(fm), epochs=args.qat_epochs, lr=args.qat_lr).eval()
    row["float+ft"] = d.evaluate(ft)
    for rounding in ("nearest", "adaround"):
        q = qcast.quantize(fm, d.calib, config=config.replace(rounding=rounding, adaround_iters=1000),
                           progress=False, check_speed=False)
        row[rounding] = d.evaluate(q)
    for rounding in ("nearest", "adaround") if args.ptq_finetuned else ():  # PTQ with QAT's training budget
        q = qcast.quantize(ft, d.calib, config=config.replace(rounding=rounding, adaround_iters=1000),
                           progress=False, check_speed=False)
        row[f"{rounding}(ft)"] = d.evaluate(q)
    prepared = qcast.prepare_qat(fm, d.calib[0], config, freeze_bn_after=args.freeze,
                                 freeze_observers_after=args.freeze, learnable_scales=args.lsq)
    d.train(prepared, epochs=args.qat_epochs, lr=args.qat_lr)
    row["qat"] = d.evaluate(qcast.convert(prepared))
    row["seconds"] = time.perf_counter() - t
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="narrow4x4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--float-epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    ap.add_argument("--freeze", type=int, default=150, help="BatchNorm/observer freeze step (150: after the run)")
    ap.add_argument("--lsq", action="store_true")
    ap.add_argument("--train", type=int, default=1400, help="training images (the rest are held out)")
    ap.add_argument("--ptq-finetuned", action="store_true",
                    help="also int4 PTQ of float+ft (PTQ with the training budget QAT had)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = Digits()
    if args.train != 1400:
        perm = torch.randperm(len(d.x), generator=torch.Generator().manual_seed(0))
        d.train_idx, d.test_idx = perm[:args.train], perm[args.train:]
    cols = ("float", "float+ft", "nearest", "adaround") + (("nearest(ft)", "adaround(ft)") if args.ptq_finetuned
                                                           else ()) + ("qat",)
    rows = []
    for setting in args.settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run(d, setting, seed, args)
            rows.append(row)
            print(f"{setting:>14} seed {seed}: " + "  ".join(f"{c} {row[c][0]:.2f}/{row[c][1]:.4f}" for c in cols)
                  + f"  ({row['seconds']:.0f} s)", flush=True)
        mine = [r for r in rows if r["setting"] == setting]
        means = {c: statistics.mean(r[c][0] for r in mine) for c in cols}
        print(f"{setting:>14} mean accuracy: " + "  ".join(f"{c} {v:.2f} ({v - means['float']:+.2f})"
                                                           for c, v in means.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
