"""The properties every fuzzed model must have (``check_graph``), shared by the CI property tests
(``tests/fuzz/test_fuzz_graphs.py``) and the long run (``benchmarks/fuzz.py``).

For one ``GraphSpec``:

1. ``qcast.quantize`` either returns a model or raises a documented ``QcastError`` (never another exception);
2. the user's model is unchanged either way: state_dict and parameters bit-identical, same tensors, ``training``
   flags, no hooks left;
3. the int8 model's outputs keep the float model's structure, are plain finite float32 tensors, within ``SQNR_FLOOR``
   dB of float (leaf by leaf) and at another batch size too;
4. on the torch backend, no quantized tensor reaches a float op and no float tensor an int8 op
   (``check_boundaries``: every value of the lowered graph is what the lowering meant it to be);
5. ``explain()`` has a row for every weighted layer call (a module called twice: two rows), every row an op name, a
   precision and, when float, a reason;
6. ``save`` / ``load`` round-trips: the loaded model gives bit-identical outputs and the same rows, and saving twice
   writes the same bytes.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

import qcast
from qcast.report import sqnr
from tests.fuzz.graphs import GraphSpec, build, weighted_sites
from tests.models import flatten_output

#: output SQNR floors vs float (dB) for random-weight models of up to 5 blocks plus a head (docs/reliability.md has
#: the distribution over the long run). On a held-out input, values beyond the calibrated range are clipped: on the
#: tiniest graphs (1 channel, 6x6) that alone costs down to ~8 dB, so the held-out floor is loose; on a calibration
#: batch nothing clips and the floor is tight: a wrong kernel gives <= 0 dB on either
SQNR_FLOOR = 5.0
CALIB_SQNR_FLOOR = 15.0
CALIB_BATCHES = 6


@dataclasses.dataclass
class Outcome:
    spec: GraphSpec
    status: str                 # "ok" | "qcast_error"
    error: str = ""
    sqnr: float | None = None          # worst output leaf on held-out inputs (two batch sizes)
    calib_sqnr: float | None = None    # worst output leaf on a calibration batch
    int8: int = 0
    rows: int = 0


def snapshot(model: nn.Module) -> dict:
    """Everything quantize must leave alone on the user's model."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: (p.requires_grad, p.dtype, p.device) for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "types": {k: type(m) for k, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "the user's model has other submodules now"
    assert after["training"] == before["training"], "training flags of the user's model changed"
    assert after["hooks"] == before["hooks"], "hooks left on the user's model"
    assert after["params"] == before["params"], "parameters' requires_grad/dtype/device changed"
    assert after["ids"] == before["ids"], "the user's model holds other tensor objects now"
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and v.shape == w.shape and torch.equal(_bits(v), _bits(w)), \
            f"the user's model's {k} changed"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def check_boundaries(qmodel: nn.Module, *args) -> None:
    """Run the torch backend's lowered graph node by node: every value is quantized exactly where the lowering said
    (``meta['qcast_quantized']``), a float op never receives a quantized tensor (only ``dequantize`` and qcast's own
    kernels do), an int8 op computed in PyTorch (``x.view``, ``max_pool2d`` on a quint8 tensor) never a float one."""
    gm = qmodel.graph_module
    if not isinstance(gm, fx.GraphModule):
        return

    def tensors(v):
        return [t for t in flatten_output(v) if isinstance(t, torch.Tensor)] if v is not None else []

    class Checker(fx.Interpreter):
        def run_node(self, n):
            want = n.meta.get("qcast_quantized")
            if n.op in ("placeholder", "output", "get_attr") or want is None:
                return super().run_node(n)
            ins = [t for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)
                   for t in tensors(self.env.get(a))]
            own = n.op == "call_module" and type(self.module.get_submodule(n.target)).__module__.startswith("qcast.")
            what = f"{n.meta.get('qcast_name', n.name)} ({n.op} {n.target})"
            if not want and not own and not (n.op == "call_method" and n.target == "dequantize"):
                assert not any(t.is_quantized for t in ins), f"a quantized tensor reached the float op {what}"
            if want and not own and n.target is not torch.quantize_per_tensor:
                assert all(t.is_quantized for t in ins), f"a float tensor reached the int8 op {what}"
            out = super().run_node(n)
            for t in tensors(out):
                assert t.is_quantized == want, f"{what} returned a {'quantized' if t.is_quantized else 'float'} " \
                                               "tensor, the lowering meant the other"
            return out

    with torch.no_grad():
        Checker(gm).run(*args)


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in flatten_output(out)]


def same_structure(a: Any, b: Any) -> None:
    assert type(a) is type(b), f"output type changed: {type(a).__name__} -> {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same_structure(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same_structure(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and b.dtype == torch.float32 and not b.is_quantized, (a.shape, b.shape, b.dtype)


def check_graph(spec: GraphSpec, *, backend: str = "torch", save_load: bool = True,
                check_floors: bool = True) -> Outcome:
    """All properties for ``spec`` (AssertionError naming the one that fails); the outcome for statistics."""
    model = build(spec)
    calib = [spec.make_input(100 + i) for i in range(CALIB_BATCHES)]
    x = spec.make_input(999)
    before = snapshot(model)
    with torch.no_grad():
        ref = model(x.clone())
        ref_b3 = model(spec.make_input(998, batch=3))
    assert_unchanged(model, before)  # the float model itself is pure (no state updated by a forward)
    if spec.seed % 2:  # half the models are handed over in training mode: quantized as in eval, flags kept
        model.train()
    before = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = qcast.quantize(model, [c.clone() for c in calib], backend=backend, progress=False,
                                    check_speed=False)
    except qcast.QcastError as e:
        assert_unchanged(model, before)
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return Outcome(spec, "qcast_error", f"{type(e).__name__}: {e}")
    # anything else propagates: an internal error is a failure
    assert_unchanged(model, before)
    with torch.no_grad():
        out = qmodel(x.clone())
        out_b3 = qmodel(spec.make_input(998, batch=3))
    same_structure(ref, out)
    same_structure(ref_b3, out_b3)
    worst = float("inf")
    for r, o in [*zip(_leaves(ref), _leaves(out)), *zip(_leaves(ref_b3), _leaves(out_b3))]:
        assert torch.isfinite(o).all(), "non-finite values in the int8 output"
        s = sqnr(r, o)
        worst = min(worst, s)
    with torch.no_grad():
        ref_c, out_c = model.eval()(calib[0].clone()), qmodel(calib[0].clone())
    model.train(before["training"][""])
    calib_sqnr = min(sqnr(r, o) for r, o in zip(_leaves(ref_c), _leaves(out_c)))
    if check_floors:
        assert worst >= SQNR_FLOOR, f"output SQNR {worst:.1f} dB < {SQNR_FLOOR} dB on a held-out input"
        assert calib_sqnr >= CALIB_SQNR_FLOOR, \
            f"output SQNR {calib_sqnr:.1f} dB < {CALIB_SQNR_FLOOR} dB on a calibration batch"
    if qmodel.qcast_meta.get("backend", "torch") == "torch":
        check_boundaries(qmodel, x.clone())

    rows = qcast.explain(qmodel)
    names = [r.name for r in rows]
    assert len(set(names)) == len(names), f"explain() repeats a row name: {names}"
    for r in rows:
        assert r.op and r.precision in ("int8", "float") and r.engine, r
        if r.precision == "float":
            assert r.reason, f"float row without a reason: {r}"
    for prefix, op in _expected_rows(spec):
        match = [r for r in rows if _row_of(r.name, prefix)]
        assert match, f"explain() has no row for {prefix} ({op}); rows: {names}"
    for prefix, n in _calls_per_site(spec).items():
        if n > 1:
            k = sum(1 for r in rows if r.name == prefix or r.name.startswith(prefix + "#"))
            assert k >= n, f"{prefix} is called {n} times, explain() has {k} rows for it"

    if save_load:
        with tempfile.TemporaryDirectory() as tmp:
            p1, p2 = os.path.join(tmp, "a.qcast"), os.path.join(tmp, "b.qcast")
            qcast.save(qmodel, p1)
            qcast.save(qmodel, p2)
            b1, b2 = open(p1, "rb").read(), open(p2, "rb").read()
            assert b1 == b2, "saving the same model twice wrote different bytes"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    loaded = qcast.load(p1, backend=backend)
                except qcast.FormatError as e:
                    if "model=" not in str(e):
                        raise
                    loaded = qcast.load(p1, model=model, backend=backend)
            assert_unchanged(model, before)
            assert open(p1, "rb").read() == b1, "load() changed the file"
            with torch.no_grad():
                out2 = loaded(x.clone())
            for a, b in zip(_leaves(out), _leaves(out2)):
                assert torch.equal(a, b), "the loaded model's outputs differ from the saved model's"
            assert qcast.explain(loaded) == rows, "the loaded model explains itself differently"
    int8 = sum(1 for r in rows if r.precision == "int8")
    return Outcome(spec, "ok", sqnr=worst, calib_sqnr=calib_sqnr, int8=int8, rows=len(rows))


def _row_of(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "#") or name.startswith(prefix + ":") \
        or name.startswith(prefix + ".")


def _expected_rows(spec: GraphSpec) -> list[tuple[str, str]]:
    """Every weighted layer call, and every op without an int8 kernel (``FloatOp`` blocks: nothing fuses them away)."""
    floats = [(f"blocks.{i}", b[1]) for i, b in enumerate(spec.blocks) if b[0] == "float_op"]
    return weighted_sites(spec) + floats


def _calls_per_site(spec: GraphSpec) -> dict[str, int]:
    counts: dict[str, int] = {}
    for prefix, _ in weighted_sites(spec):
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts
