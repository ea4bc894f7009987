"""Shared fixtures of the qcast test-suite (helpers live in ``tests/helpers.py``).

* ``sqnr`` / ``quantize_zoo`` / ``quantize_small``: the helpers of ``tests.helpers``, as fixtures (and as names of
  this module).
* an autouse fixture checking that no test changes process-wide torch state (quantized engine, threads, grad mode).
* ``QCAST_BACKEND=torch`` unless set: the default backend of every test that does not name one.

The suite pins torch to one intra-op thread (override with ``QCAST_TEST_THREADS``): on a shared 2-core machine,
2 OpenMP threads competing with other processes made qcast's histogram search up to 50x slower, and one thread
also keeps the float reference outputs reproducible.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import quantize_small, quantize_zoo, sqnr  # noqa: F401  (re-exported)

torch.set_num_threads(int(os.environ.get("QCAST_TEST_THREADS", "1")))
# backend="auto" (the default) compiles the model for every installed engine and times them: seconds per quantize.
# The suite tests the backends explicitly (tests/backends/) and everything else on the torch backend, the reference
# executor (set before any QuantConfig is made; subprocesses of tests inherit it).
os.environ.setdefault("QCAST_BACKEND", "torch")


def pytest_configure(config):
    # torch 2.13 deprecates quantized tensor creation (pytorch#184982); qcast's torch backend is built on it
    config.addinivalue_line("filterwarnings", "ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning")


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(name="sqnr")
def _sqnr_fixture():
    return sqnr


@pytest.fixture(name="quantize_zoo")
def _quantize_zoo_fixture():
    return quantize_zoo


@pytest.fixture(name="quantize_small")
def _quantize_small_fixture():
    return quantize_small


@pytest.fixture(autouse=True)
def _global_torch_state_unchanged():
    """qcast promises to restore process-wide state after every call (API.md): check it after each test."""
    engine = torch.backends.quantized.engine
    threads = torch.get_num_threads()
    grad = torch.is_grad_enabled()
    yield
    assert torch.backends.quantized.engine == engine, (
        f"torch.backends.quantized.engine changed from {engine!r} to {torch.backends.quantized.engine!r}")
    assert torch.get_num_threads() == threads, f"torch thread count changed from {threads} to {torch.get_num_threads()}"
    assert torch.is_grad_enabled() == grad, "grad mode changed"
