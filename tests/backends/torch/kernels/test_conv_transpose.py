"""QConvTranspose and the engine probe: int8 transposed convs against exact int8 arithmetic, computed in float."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcast.backends.torch.kernels.conv_transpose import ConvTransposeKernel, QConvTranspose
from qcast.backends.torch.kernels.engines import available
from qcast.observers import fake_quant_tensor, tensor_grid
from tests.helpers import sqnr

LAYERS = {
    "2d_stride2": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1), (1, 8, 7, 7)),
    "2d_output_padding": (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (1, 8, 7, 7)),
    "2d_groups": (lambda: nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2), (1, 8, 5, 5)),
    "1d": (lambda: nn.ConvTranspose1d(4, 2, 3, stride=2), (1, 4, 9)),
}


def _exact(mod, x):
    fn = nn.functional.conv_transpose1d if isinstance(mod, nn.ConvTranspose1d) else nn.functional.conv_transpose2d
    return fn(x.dequantize(), fake_quant_tensor(mod.weight), mod.bias, mod.stride, mod.padding, mod.output_padding,
              mod.groups, mod.dilation)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fbgemm_computes_transposed_convs_exactly_to_its_8_bit_output(name):
    if "fbgemm" not in available():
        pytest.skip("no fbgemm in this PyTorch build")
    torch.manual_seed(0)
    build, shape = LAYERS[name]
    mod = build().eval()
    x = torch.quantize_per_tensor(torch.rand(shape) * 2 - 1, 2 / 255, 128, torch.quint8)
    with torch.no_grad():
        ref = _exact(mod, x)
        span = float(ref.abs().max())
        out = QConvTranspose.from_float(mod, 2 * span / 255, 128, "fbgemm")(x).dequantize()
        fp32 = QConvTranspose.from_float(mod, None, None, "fbgemm")(x)
    assert sqnr(ref, out) >= 35.0  # an 8-bit requantized output: measured 40-44 dB
    assert sqnr(ref, fp32) >= 100.0  # fp32 output: the same sums in float


def test_the_probe_rejects_an_engine_that_computes_the_layer_wrong():
    """Measured on an Intel Xeon with AMX, torch 2.13: oneDNN's int8 conv_transpose2d returns wrong values (about
    -2 dB against exact int8 arithmetic); the probe must say so, and the kernel must land on an engine that is exact."""
    torch.manual_seed(0)
    mod = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1).eval()

    class Ctx:
        setting = staticmethod(lambda node, key: "auto")
        module = staticmethod(lambda node: mod)
        meta = staticmethod(lambda node: type("M", (), {"shape": (2, 8, 7, 7)}))

    node = torch.fx.Graph().placeholder("x")
    node.args = (node,)
    engine = ConvTransposeKernel.engine(node, Ctx)
    ConvTransposeKernel._try(mod, (2, 8, 7, 7), engine)  # the chosen engine passes its own probe
    for eng in ("onednn", "x86"):
        if eng in available() and eng != engine:
            with pytest.raises(RuntimeError, match="computes this layer wrong|only supports"):
                ConvTransposeKernel._try(mod, (2, 8, 7, 7), eng)
            assert eng in node.meta.get("qcast_engine_note", ""), node.meta


def test_per_tensor_grid_is_exact_on_a_weight_already_on_it():
    w = torch.randn(8, 6, 3, 3)
    fq = fake_quant_tensor(w)
    wq, scale = tensor_grid(fq)
    assert torch.equal(wq.float() * scale, fq) and int(wq.abs().max()) == 127


def test_spec_rebuilds_the_same_kernel():
    torch.manual_seed(0)
    mod = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1).eval()
    q = QConvTranspose.from_float(mod, 0.05, 128, "fbgemm")
    config, tensors = q.spec()
    again = QConvTranspose.from_spec(config, tensors)
    x = torch.quantize_per_tensor(torch.rand(1, 8, 5, 5) * 2 - 1, 2 / 255, 128, torch.quint8)
    assert torch.equal(q(x).int_repr(), again(x).int_repr())
    assert "per-tensor" in repr(q)
