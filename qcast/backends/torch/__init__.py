"""The ``torch`` backend: PyTorch's own int8 CPU kernels (nothing extra to install).

``kernels/``: the kernel table, one entry per (op, engine family) registered with ``@register``; it also *plans*
every backend's graph (which ops are int8 and with which params: ``Backend.kernels``). ``lower.py``: the QDQ graph
rebuilt on those kernels. ``engines.py`` (in ``kernels/``): PyTorch's int8 engines (onednn, x86, fbgemm, qnnpack).
"""
from __future__ import annotations

from .. import register_backend


def _conv_add(engine: str) -> bool:
    """Whether a conv planned on ``engine`` runs a following residual add in the same int8 op: oneDNN's conv2d_add
    (``auto`` picks onednn where it is available)."""
    from .kernels.engines import available

    return engine in ("onednn", "auto") and "onednn" in available()


@register_backend("torch", conv_add=_conv_add, traces=False)
def lower(qdq, config, example_args, example_kwargs):
    import torch

    from .lower import lower_torch

    with torch.no_grad():
        return lower_torch(qdq, config)
