"""Graphs the fuzzer found failing, kept as explicit tests (each fixed in qcast; the spec is the failing example)."""
import pytest
import torch

import qcast
from tests.fuzz.graphs import GraphSpec, build
from tests.fuzz.properties import check_graph

FOUND = {
    # safetensors writes its metadata from a hash map: the same model saved twice gave different bytes
    # (fixed: serialize._canonical_header writes the header in sorted key order)
    "save_twice_same_bytes": GraphSpec(
        kind="image", channels=1, size=6, blocks=(("conv", 4, 1, 1, 1, True, False, "sigmoid"), ("pool", "avg", 2)),
        head="none", output="dict", seed=53457),
    # `x @ self.weight.t()`: the folded constant kept the transposed strides, the loaded one was contiguous, and the
    # matmul rounded differently (fixed: fold_constants stores contiguous constants)
    "folded_transpose_loads_bit_exact": GraphSpec(
        kind="image", channels=4, size=6, blocks=(("pool", "avg", 2), ("act", "hardswish")), head="matmul_t",
        output="dict", seed=49541),
    # nn.GRU returns a tuple: it had no explain() row, and load() needed model= for it (fixed: plan.py shows weighted
    # layers returning structures; serialize rebuilds RNN layers from their attributes)
    "gru_explained_and_saved": GraphSpec(
        kind="tokens", channels=16, size=5, blocks=(("layernorm", True), ("act", "none"), ("rnn", "gru", 16)),
        head="flinear", output="tuple", seed=24030),
    # a loaded GRU's weights required grad, so PyTorch ran another CPU kernel with other rounding (fixed: loaded
    # layers are grad-free like the quantized model's)
    "gru_loads_bit_exact": GraphSpec(
        kind="tokens", channels=8, size=3, blocks=(("matmul_w", 8, True, "hardtanh"), ("flinear", 16, False, "silu"),
                                                   ("rnn", "gru", 8), ("layernorm", True), ("float_op", "clamp")),
        head="linear", output="tuple", seed=50870),
    "stacked_lstms": GraphSpec(
        kind="tokens", channels=16, size=5, blocks=(("rnn", "lstm", 8), ("rnn", "lstm", 16),
                                                    ("flinear", 16, True, "relu_inplace"), ("rnn", "gru", 8)),
        head="matmul_t", output="dict", seed=20643),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_found_graph(name):
    out = check_graph(FOUND[name])
    assert out.status == "ok", out.error


def test_recurrent_layers_have_a_row_with_the_reason():
    rows = qcast.explain(qcast.quantize(build(FOUND["stacked_lstms"]), [FOUND["stacked_lstms"].make_input(i)
                                                                         for i in range(2)],
                                        progress=False, check_speed=False))
    by_name = {r.name: r for r in rows}
    for name in ("blocks.0.rnn", "blocks.1.rnn", "blocks.3.rnn"):
        assert name in by_name, [r.name for r in rows]
        assert by_name[name].op in ("lstm", "gru") and by_name[name].reason


def test_a_failed_torch_export_prints_nothing_on_stderr(capfd):
    """A model neither fx nor torch.export can capture is a CaptureError, without torch.export's pages of partial
    graphs and guard logs on stderr before it."""
    spec = GraphSpec(kind="image", channels=1, size=6, blocks=(("resize", "nearest"), ("shape_py",), ("data_py",)),
                     head="flinear", output="tuple", seed=27815)
    with pytest.raises(qcast.CaptureError, match="top-level forward"):
        qcast.quantize(build(spec), [spec.make_input(i) for i in range(2)], progress=False, check_speed=False)
    err = capfd.readouterr().err
    assert "def forward" not in err and "symbolic_shapes" not in err, err[:500]


def test_a_residual_conv_with_fp32_output_is_probed_and_kept_int8():
    """The engine probe checks a conv with a fused residual add in both its int8- and fp32-output kernels, each on its
    own copy of the accumulator (the int8 kernel writes into it: reusing it made the fp32 check fail and the layer
    fall back to float). A 1-channel residual, the fuzzer's smallest, stays int8 and exact."""
    import torch.nn as nn
    import torch.nn.functional as F

    class R(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            x = self.c1(x)
            return F.relu(self.c2(x) + x)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    q = qcast.quantize(R().eval(), [torch.randn(2, 1, 6, 6, generator=g) for _ in range(3)], progress=False,
                       check_speed=False)
    row = next(r for r in qcast.explain(q) if r.name == "c2")
    assert row.precision == "int8" and "fused add" in row.reason, row
