"""What every kernel implementation provides, and the module registry used by save/load."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

KERNEL_MODULES: dict[str, type] = {}


def kernel_module(cls):
    """Register an int8 kernel module class so a saved graph can rebuild it by name (no pickle)."""
    KERNEL_MODULES[cls.__name__] = cls
    return cls


class KernelImpl:
    """Default behaviour of a registry entry; kernel files override what differs."""

    #: int8 only when one of its inputs already is (avoids a quantize just to run a cheap op)
    needs_int8_input = False

    @staticmethod
    def check(node: fx.Node, ctx) -> str | None:
        return None

    @staticmethod
    def quant_inputs(node: fx.Node) -> list[fx.Node]:
        a = node.args[0] if node.args else None
        return [a] if isinstance(a, fx.Node) else []

    @staticmethod
    def kind_of(node: fx.Node, default: str) -> str:
        return default

    @staticmethod
    def float_output(node: fx.Node) -> bool:
        """Whether this ``compute`` op has a kernel that writes fp32 (used where no int8 op reads its output;
        without one the op runs in float there, ``plan.place_outputs``)."""
        return False

    @staticmethod
    def engine(node: fx.Node, ctx) -> str:
        return "native"

    @staticmethod
    def note(node: fx.Node, ctx) -> str:
        """What explain() should add to an int8 row's reason about this call (``""``: nothing)."""
        return ""


#: a layer's int8 result must agree with exact integer arithmetic to this SQNR (dB) on the probe input; an 8-bit
#: requantized output measures 30-33 dB there (an fp32 output: > 100 dB), the broken kernels below 10 dB
PROBE_MIN_SQNR = 25.0


def check_probe(ref, out, kernel: str = "int8") -> None:
    """Raise if ``out`` (the engine's result on the probe input, dequantized) is further than ``PROBE_MIN_SQNR`` from
    ``ref`` (the same int8 values computed in float): the engine computes this layer wrong."""
    import math

    err = float((ref - out).pow(2).mean())
    got = 10 * math.log10(float(ref.pow(2).mean()) / err) if err > 0 else float("inf")
    if not got >= PROBE_MIN_SQNR:
        raise RuntimeError(f"its {kernel} kernel computes this layer wrong ({got:.1f} dB against exact int8 "
                           "arithmetic on a probe input)")


def first_engine(node: fx.Node, candidates, probe, none_left: str) -> str:
    """The first of ``candidates`` for which ``probe(engine)`` does not raise; the rejected ones, with their evidence,
    go into ``node.meta["qcast_engine_note"]`` (explain() says why the layer is not on the engine it would have had).
    ``none_left``: the error's text when every engine is rejected."""
    errors = []
    for eng in candidates:
        try:
            probe(eng)
            if errors:
                node.meta["qcast_engine_note"] = "not on " + "; ".join(errors)
            return eng
        except Exception as e:  # noqa: BLE001 - evidence: this engine cannot run this layer
            errors.append(f"{eng}: {str(e).splitlines()[0][:120]}")
    raise RuntimeError(f"{none_left} (" + "; ".join(errors) + ")")


def input_meta(node: fx.Node, ctx):
    """Shape/dtype of a node's first argument (``TensorMeta``), or None when it is not a traced tensor."""
    return ctx.meta(node.args[0]) if node.args else None


def not_float_input(node: fx.Node, ctx) -> str | None:
    """Why a node's first argument rules out an int8 kernel: it is not a traced floating-point tensor (None: it is)."""
    meta = input_meta(node, ctx)
    return None if meta is not None and meta.is_float else "its input is not a floating-point tensor"


class KernelModule(nn.Module):
    """Base of int8 kernel modules: ``spec()`` gives JSON-able config + tensors; ``from_spec`` rebuilds."""

    def spec(self) -> tuple[dict, dict]:
        raise NotImplementedError

    @classmethod
    def from_spec(cls, config: dict, tensors: dict):
        return cls(**config, **tensors)


class PackedKernelModule(KernelModule):
    """A kernel module holding packed weights (an opaque object ``deepcopy`` cannot copy): a copy is rebuilt from
    ``spec()``, which repacks them."""

    def __deepcopy__(self, memo):
        config, tensors = self.spec()
        return type(self).from_spec(config, {k: v.clone() for k, v in tensors.items()})
