"""Uncaptured regions on an engine: what the split costs, and whether a tiny stage should stay in torch.

    python benchmarks/regions.py [--n 30]

Batch 1, ``QCAST_BENCH_THREADS`` threads (2), medians of ``n`` interleaved runs after warm-up (benchmarks/common.py);
``load``: the cores other processes kept busy meanwhile (above ~0.2 the figures are noisy).

1. The zoo UNet (128x128, random weights) whose ``gate`` branches on its input's mean: torch backend vs each engine
   running its two captured stages with the gate in torch between them; the same UNet with the gate replaced by an
   identity that is also an uncaptured region (``split``), and by ``nn.Identity`` (``whole``: one engine call): their
   difference is what cutting the graph costs (a second engine call, its input/output copies).
2. A stage holding a single int8 conv between two regions: on the engine, or in torch as the QDQ simulation (float
   conv + fake-quant), at a small and a larger size; and a stage of float ops only (no int8 compute op) in torch or
   on the engine: which side of ``regions`` should take such stages.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import qcast  # noqa: E402
from benchmarks.common import latency_stats_interleaved, randomize_bn_stats, set_threads  # noqa: E402
from qcast.backends import regions  # noqa: E402
from qcast.report import sqnr  # noqa: E402

ENGINES = ("openvino", "onnxruntime")


class IdentityRegion(nn.Module):
    """An identity qcast cannot capture (a data-dependent ``if``): the split without the region's own cost."""

    def forward(self, x):
        if x.mean() > float("-inf"):
            return x
        return -x


class Sign(nn.Module):
    """A cheap region that branches on its input."""

    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x


class FloatStage(nn.Module):
    """Two regions with only float work between them (no int8 compute op: a sigmoid and a multiply)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Sign(), Sign()

    def forward(self, x):
        y = self.a(x)
        return self.b(y * torch.sigmoid(y))


class OneConvStage(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.conv, self.b = Sign(), nn.Conv2d(c, c, 3, padding=1), Sign()

    def forward(self, x):
        return self.b(torch.relu(self.conv(self.a(x))))


def unet(gate: str):
    from tests.models.custom import user_unet
    torch.manual_seed(0)
    model = user_unet(with_gate=gate == "gate").eval()
    if gate == "identity region":
        model.gate = IdentityRegion()
    randomize_bn_stats(model)
    return model


def quantize(model, calib, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcast.quantize(model, calib, backend=backend, progress=False, check_speed=False)


def report(title: str, models: dict, x: torch.Tensor, n: int) -> None:
    stats = latency_stats_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, n=n)
    with torch.no_grad():
        print(f"\n{title}")
        for k, m in models.items():
            s = stats[k]
            print(f"  {k:44s} {s['median']:8.3f} ms  (min {s['min']:.3f}, p10 {s['p10']:.3f}, p90 {s['p90']:.3f}, "
                  f"load {s['foreign_load']:.2f})  {sqnr(m.qcast_qdq(x), m(x)):6.1f} dB vs simulation")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    set_threads()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(2, 3, 128, 128, generator=g) for _ in range(8)]
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    models = {}
    for gate in ("gate", "identity region", "nn.Identity"):
        model = unet(gate)
        for backend in ("torch",) + ENGINES:
            if backend == "torch" and gate != "gate":
                continue
            how = "whole" if gate == "nn.Identity" else "split"
            models[f"UNet, {gate}: {backend} ({how})"] = quantize(model, calib, backend)
    report("zoo UNet 128x128, batch 1", models, x, args.n)

    for c, size in ((16, 32), (64, 56)):
        torch.manual_seed(0)
        model = OneConvStage(c).eval()
        calib = [torch.randn(2, c, size, size, generator=g) for _ in range(4)]
        x = torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(1))
        models = {"torch backend": quantize(model, calib, "torch")}
        for engine in ENGINES:
            models[f"{engine}: conv stage on the engine"] = quantize(model, calib, engine)
            real = regions._computes_int8
            regions._computes_int8 = lambda n: False  # every captured stage as the QDQ simulation in torch
            try:
                models[f"{engine}: conv stage in torch (simulation)"] = quantize(model, calib, engine)
            finally:
                regions._computes_int8 = real
        report(f"region -> one int8 conv {c}->{c} 3x3 -> region, {size}x{size}, batch 1", models, x, args.n)

    calib = [torch.randn(2, 16, 32, 32, generator=g) for _ in range(4)]
    x = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    models = {"torch backend": quantize(FloatStage().eval(), calib, "torch")}
    for engine in ENGINES:
        models[f"{engine}: float stage in torch"] = quantize(FloatStage().eval(), calib, engine)
        real = regions._computes_int8
        regions._computes_int8 = lambda n: True  # every captured stage on the engine
        try:
            models[f"{engine}: float stage on the engine"] = quantize(FloatStage().eval(), calib, engine)
        finally:
            regions._computes_int8 = real
    report("region -> x * sigmoid(x) (float) -> region, 16x32x32, batch 1", models, x, args.n)


if __name__ == "__main__":
    main()
