"""The fuzz properties catch what they are for (a check that cannot fail proves nothing)."""
import pytest
import torch

import qcast
from tests.fuzz.graphs import GraphSpec, build
from tests.fuzz.properties import assert_unchanged, check_boundaries, snapshot

SPEC = GraphSpec(kind="image", channels=3, size=8, blocks=(("conv", 8, 3, 1, 1, True, False, "relu"),
                                                             ("float_op", "sin"), ("conv", 8, 3, 1, 1, True, False, "none")),
                 head="linear", output="tensor", seed=3)


def _quantized():
    return qcast.quantize(build(SPEC), [SPEC.make_input(i) for i in range(2)], progress=False, check_speed=False)


def test_boundary_check_passes_on_the_lowering_and_catches_a_quantized_tensor_in_a_float_op():
    q = _quantized()
    x = SPEC.make_input(9)
    check_boundaries(q, x)
    gm = q.graph_module
    sin = next(n for n in gm.graph.nodes if n.meta.get("qcast_quantized") is False and "sin" in str(n.target))
    with gm.graph.inserting_before(sin):  # a quantize the lowering did not mean: the float sin gets a quint8 tensor
        quant = gm.graph.call_function(torch.quantize_per_tensor, (sin.args[0], 0.05, 128, torch.quint8))
    sin.replace_input_with(sin.args[0], quant)
    gm.recompile()
    with pytest.raises(AssertionError, match="a quantized tensor reached the float op blocks.1:sin"):
        check_boundaries(q, x)


def test_boundary_check_catches_a_float_tensor_in_an_int8_op():
    q = _quantized()
    gm = q.graph_module
    quant = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor)
    quant.meta["qcast_quantized"] = False  # as if the lowering had meant a float value there
    with pytest.raises(AssertionError, match="a float tensor reached the int8 op|returned a quantized tensor"):
        check_boundaries(q, SPEC.make_input(9))


def test_unchanged_check_catches_a_changed_weight_flag_and_hook():
    model = build(SPEC)
    before = snapshot(model)
    with torch.no_grad():
        model.blocks[0].conv.weight[0, 0, 0, 0] += 1e-7
    with pytest.raises(AssertionError, match="weight changed"):
        assert_unchanged(model, before)
    model = build(SPEC)
    before = snapshot(model)
    model.blocks[1].train()
    with pytest.raises(AssertionError, match="training flags"):
        assert_unchanged(model, before)
    model = build(SPEC)
    before = snapshot(model)
    model.register_forward_hook(lambda *a: None)
    with pytest.raises(AssertionError, match="hooks"):
        assert_unchanged(model, before)
