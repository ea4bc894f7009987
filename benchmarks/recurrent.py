"""Recurrent and embedding-bag layers: the int8 kernels of the torch backend (qcast/backends/torch/kernels/recurrent.py,
embedding_bag.py) against the float layers, interleaved in one process (``qcast.timing``), with their SQNR vs float.

    PYTHONPATH=. python benchmarks/recurrent.py [--threads 1]

Results go in docs/benchmarks.md ("Recurrent and embedding-bag layers"); no speed target is asserted in tests.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn

from qcast.backends.torch.kernels.embedding_bag import QEmbeddingBag
from qcast.backends.torch.kernels.recurrent import QRecurrentDynamic
from qcast.report import sqnr
from qcast.timing import time_interleaved


def cases():
    g = torch.Generator().manual_seed(0)
    for cell, cls in (("lstm", nn.LSTM), ("gru", nn.GRU)):
        for hidden, layers, bi in ((256, 1, False), (512, 2, True)):
            torch.manual_seed(0)
            layer = cls(hidden, hidden, num_layers=layers, bidirectional=bi, batch_first=True).eval()
            x = torch.randn(8, 64, hidden, generator=g)
            yield f"{cell} {hidden}x{layers}{' bi' if bi else ''} (8x64 steps)", layer, QRecurrentDynamic.from_float(layer), (x,)
    for mode in ("sum", "mean"):
        torch.manual_seed(0)
        bag = nn.EmbeddingBag(100_000, 64, mode=mode).eval()
        idx = torch.randint(0, 100_000, (4096,), generator=g)
        offsets = torch.arange(0, 4096, 32)
        yield f"embedding_bag {mode} 100k x 64 (128 bags of 32)", bag, QEmbeddingBag.from_float(bag.weight, mode), (idx, offsets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    print(f"{'case':<46} {'float ms':>9} {'int8 ms':>9} {'speedup':>8} {'SQNR dB':>8}")
    for name, fp, q, inputs in cases():
        with torch.no_grad():
            ref, out = fp(*inputs), q(*inputs)
        ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
        times, _ = time_interleaved({"float": fp, "int8": q}, inputs, {})
        print(f"{name:<46} {times['float']:>9.3f} {times['int8']:>9.3f} {times['float'] / times['int8']:>7.2f}x "
              f"{sqnr(ref, out):>8.1f}")


if __name__ == "__main__":
    main()
