"""The kernel registry: one table that planning, lowering and `qcast ops` all read."""
from __future__ import annotations

import pytest

from qcast.capture import FUNCTION_OPS, METHOD_OPS, MODULE_OPS
from qcast.backends.torch.kernels import backends, kernels, lookup
from qcast.passes.decompose_sdpa import _PARTS as _SDPA_PARTS
from qcast.backends.torch.kernels.registry import KINDS

REQUIRED_OPS = ["conv2d", "linear", "add", "mul", "cat", "max_pool", "avg_pool", "adaptive_avg_pool", "flatten",
                "relu", "hardswish", "sigmoid", "interpolate"]


def test_kinds_are_the_documented_four():
    assert set(KINDS) == {"compute", "passthrough", "fixed", "weight_only"}


def test_every_registered_op_has_a_valid_entry():
    entries = kernels()
    assert entries, "the registry is empty"
    seen = set()
    for k in entries:
        assert k.kind in ("compute", "passthrough", "fixed", "weight_only"), k
        assert isinstance(k.op, str) and k.op, k
        assert k.backend in backends(), k
        assert isinstance(k.engines, tuple) and k.engines, f"{k.op}: no engine listed"
        assert k.notes, f"{k.op}: no notes for the supported-op table"
        assert (k.op, k.backend) not in seen, f"{k.op} registered twice on {k.backend}"
        seen.add((k.op, k.backend))
        assert lookup(k.op, k.backend) is k


@pytest.mark.parametrize("op", REQUIRED_OPS)
def test_required_op_is_registered_on_torch_backend(op):
    k = lookup(op, "torch")
    assert k is not None, f"no int8 kernel registered for {op!r}"
    assert k.kind in KINDS


def test_kind_specific_hooks_exist():
    """compute kernels can be lowered (build), fixed kernels carry their output params."""
    for k in kernels("torch"):
        impl = k.impl
        for hook in ("check", "quant_inputs", "kind_of"):
            assert callable(getattr(impl, hook, None)), f"{k.op}: missing {hook}"
        if k.kind in ("compute", "weight_only"):
            assert callable(getattr(impl, "build", None)), f"{k.kind} kernel {k.op} has no build()"
        if k.kind == "fixed":
            qp = impl.fixed_qparams
            lo, hi = qp.range
            assert lo < hi and qp.qmin < qp.qmax, qp


def test_fixed_output_ranges():
    sig, tanh = lookup("sigmoid", "torch"), lookup("tanh", "torch")
    assert sig.kind == "fixed" and tanh.kind == "fixed"
    lo, hi = sig.impl.fixed_qparams.range
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0, abs=1 / 256)
    lo, hi = tanh.impl.fixed_qparams.range
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(1.0, abs=2 / 256)


def test_every_registered_op_name_can_be_produced_by_capture():
    """A kernel registered under a name capture never produces would be dead code in the table."""
    names = set(MODULE_OPS.values()) | set(FUNCTION_OPS.values()) | set(METHOD_OPS.values())
    names |= {op for _, op in _SDPA_PARTS}  # what scaled_dot_product_attention is decomposed into
    # '<op>:dynamic' is the per-token variant plan picks for <op> under activation="dynamic"/"auto"
    dead = [k.op for k in kernels() if k.op.split(":")[0] not in names
            or ":" in k.op and k.op.split(":")[1] != "dynamic"]
    assert not dead, f"registered ops no capture rule maps to: {dead}"


def test_unknown_op_and_backend_have_no_kernel():
    assert lookup("definitely_not_an_op", "torch") is None
    assert lookup("conv2d", "no_such_backend") is None
    assert "torch" in backends()
