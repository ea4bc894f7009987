"""The default backend: PyTorch's own int8 kernels (``qcast/kernels``), lowered by ``convert.lower_torch``."""
from __future__ import annotations

from . import register_backend


@register_backend("torch", traces=False)
def lower(qdq, config, example_args, example_kwargs):
    import torch

    from ..convert import lower_torch

    with torch.no_grad():
        return lower_torch(qdq, config)
