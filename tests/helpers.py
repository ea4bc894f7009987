"""Helpers shared by the qcast tests (imported by ``tests/conftest.py``, which also exposes them as fixtures).

* ``sqnr(ref, out)``            signal-to-quantization-noise ratio in dB, float model output as the oracle.
* ``quantize_zoo(name, seed)``  (float_model, qmodel, test_input) for a ``tests.models.ZOO`` entry, cached per
                                session (callers must not mutate what they get back).
* ``quantize_small(...)``       quantize a small hand-written model on random data and run it on held-out data.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable

import torch
import torch.nn as nn

import qcast
from qcast.report import sqnr as qcast_sqnr
from tests.models import ZOO, flatten_output, randomize_bn_stats, seed_everything

#: calibration protocol used everywhere: 8 batches of 2, held-out test input from another seed
CALIB_BATCHES = 8
BATCH = 2
TEST_SEED = 10_000

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: ops that carry weights; the "int8 coverage" of a model is measured on these rows of explain()
WEIGHTED_OPS = ("conv1d", "conv2d", "conv3d", "linear")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """SQNR in dB of ``out`` against the reference ``ref``: 10*log10(sum(ref^2) / sum((ref-out)^2))."""
    assert isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor), (type(ref), type(out))
    assert not out.is_quantized, "a quantized tensor leaked out of the model"
    assert ref.shape == out.shape, f"shape mismatch: float {tuple(ref.shape)} vs quantized {tuple(out.shape)}"
    assert torch.isfinite(out).all(), "non-finite values in the quantized output"
    return qcast_sqnr(ref, out)  # the same sqnr() users get from qcast.report


def leaf_sqnrs(ref_out: Any, q_out: Any) -> list[float]:
    """SQNR of every tensor leaf of a (possibly structured) output, in ``flatten_output`` order."""
    refs, outs = flatten_output(ref_out), flatten_output(q_out)
    assert len(refs) == len(outs), f"{len(refs)} float output tensors vs {len(outs)} quantized"
    return [sqnr(r, o) for r, o in zip(refs, outs)]


def same_structure(a: Any, b: Any) -> None:
    """Assert ``b`` has the container structure of ``a``: same types, dict keys, dataclass fields, lengths."""
    assert type(a) is type(b), f"output type changed: {type(a).__name__} -> {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"dict keys changed: {list(a)} -> {list(b)}"
        for k in a:
            same_structure(a[k], b[k])
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same_structure(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same_structure(x, y)


# ------------------------------------------------------------------------------------------------
# model builders
# ------------------------------------------------------------------------------------------------
def build_zoo(name: str, seed: int = 0) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """A ZOO model in eval mode with randomized BN statistics, and its input function."""
    factory, input_fn = ZOO[name]
    seed_everything(seed)
    model = factory().eval()
    randomize_bn_stats(model, seed=seed)
    return model, input_fn


def zoo_calibration(input_fn, seed: int = 0, n: int = CALIB_BATCHES) -> list[torch.Tensor]:
    return [input_fn(batch=BATCH, seed=1000 * seed + i) for i in range(n)]


def quantize_zoo(name: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(float_model, qmodel, test_input) for ZOO[name]; default config, 8 calibration batches of 2, held-out test
    batch of 2. BN statistics randomized (``randomize_bn_stats``) so folding is not a no-op.

    Cached for the session: do not mutate the returned models.
    """
    return _quantize_zoo(name, int(seed))


@functools.lru_cache(maxsize=None)
def _quantize_zoo(name: str, seed: int) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model, input_fn = build_zoo(name, seed)
    qmodel = qcast.quantize(model, zoo_calibration(input_fn, seed), progress=False)
    return model, qmodel, input_fn(batch=BATCH, seed=TEST_SEED + seed)


@dataclasses.dataclass(repr=False)
class SmallResult:
    model: nn.Module
    qmodel: nn.Module
    x: Any            # held-out test input (one call: Tensor, tuple or dict)
    ref: Any          # float model output on x
    out: Any          # quantized model output on x

    @property
    def sqnr(self) -> float:
        return min(leaf_sqnrs(self.ref, self.out))

    @property
    def rows(self) -> list[qcast.OpInfo]:
        return qcast.explain(self.qmodel)

    def __repr__(self) -> str:
        return f"SmallResult({type(self.model).__name__}, sqnr={self.sqnr:.2f} dB)"


def call(model, item):
    """One calibration-style item as a call: Tensor -> model(t), Mapping -> model(**d), tuple/list -> model(*t)."""
    if isinstance(item, torch.Tensor):
        return model(item)
    if isinstance(item, collections.abc.Mapping):
        return model(**item)
    return model(*item)


def quantize_small(model: nn.Module, make_input: Callable[[torch.Generator], Any] | tuple[int, ...], *,
                   config=None, batches: int = CALIB_BATCHES, seed: int = 0) -> SmallResult:
    """Quantize ``model`` on ``batches`` random inputs and run float and int8 on a held-out input.

    ``make_input`` is a shape (standard normal input) or ``fn(generator) -> item``.
    """
    if isinstance(make_input, tuple):
        shape = make_input
        make_input = lambda g: torch.randn(*shape, generator=g)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    model = model.eval()
    data = [make_input(g) for _ in range(batches)]
    x = make_input(g)
    qmodel = qcast.quantize(model, data, config=config, progress=False)
    with torch.no_grad():
        ref, out = call(model, x), call(qmodel, x)
    return SmallResult(model, qmodel, x, ref, out)


def assert_sqnr(measured: float, threshold: float, what: str = "") -> None:
    """``measured >= threshold``; with QCAST_PRINT_SQNR=1 (and ``pytest -s``) also prints the value, so thresholds
    can be re-measured after an intentional accuracy change."""
    if os.environ.get("QCAST_PRINT_SQNR"):
        print(f"\nSQNR {what}: {measured:.2f} dB (threshold {threshold})")
    assert measured >= threshold, f"{what}: SQNR {measured:.2f} dB < {threshold} dB"


def run_isolated(code: str, timeout: float = 300.0, warnings: str = "ignore") -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process at the repository root (for cases that can crash the interpreter, and
    for what a user sees on stderr: ``warnings="default"`` shows each warning as Python would)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS=warnings)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
