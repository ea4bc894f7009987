"""The kernel registry: which op runs int8 on which backend, and how it is lowered.

One private table keyed by ``(op, backend)``, filled by the ``@register`` decorator. ``prepare`` asks it
which nodes can be int8, ``convert`` asks it how to lower them, and ``qcast ops`` prints it: the
supported-op table can never drift from the code.

Kinds:

* ``compute``      the kernel produces a new quantized tensor with its own calibrated output params
* ``passthrough``  works on the quantized tensor as is (shape ops, max pool, relu...): no requantization
* ``fixed``        output params are fixed by the op (sigmoid, tanh)
* ``weight_only``  int8 weights, float input and output (embedding): its value is not an int8 edge
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KINDS = ("compute", "passthrough", "fixed", "weight_only")


@dataclass(frozen=True)
class Kernel:
    """One registry entry. ``impl`` provides ``check(node, ctx)`` and ``lower(node, ctx, args)``."""

    op: str
    backend: str
    kind: str
    engines: tuple[str, ...]
    notes: str
    impl: type

    def __repr__(self) -> str:
        return f"Kernel({self.op!r}, backend={self.backend!r}, kind={self.kind!r}, engines={list(self.engines)})"


_REGISTRY: dict[tuple[str, str], Kernel] = {}


def register(*ops: str, backend: str = "torch", kind: str, engines: tuple[str, ...] = (), notes: str = "") -> Callable:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")

    def deco(impl: type) -> type:
        for op in ops:
            key = (op, backend)
            if key in _REGISTRY:
                raise ValueError(f"kernel for {key} registered twice")
            _REGISTRY[key] = Kernel(op, backend, kind, tuple(engines), notes or (impl.__doc__ or "").strip().split("\n")[0], impl)
        return impl

    return deco


_DECLINED: dict[tuple[str, str], str] = {}


def decline(op: str, reason: str, backend: str = "torch") -> None:
    """Record that ``op`` deliberately has no int8 kernel on ``backend``, and why (a measurement): ``explain()``
    gives this reason instead of the generic one."""
    _DECLINED[(op, backend)] = reason


def declined(op: str, backend: str) -> str | None:
    _load()
    return _DECLINED.get((op, backend))


def lookup(op: str, backend: str) -> Kernel | None:
    _load()
    return _REGISTRY.get((op, backend))


def kernels(backend: str | None = None) -> list[Kernel]:
    _load()
    return sorted((k for k in _REGISTRY.values() if backend is None or k.backend == backend),
                  key=lambda k: (k.backend, k.kind, k.op))


def backends() -> list[str]:
    _load()
    return sorted({k.backend for k in _REGISTRY.values()})


def _load() -> None:
    # importing the kernel modules fills the table through their decorators
    from . import torch_backend  # noqa: F401
