"""The ``torch`` backend: PyTorch's own int8 CPU kernels (nothing extra to install).

Importing this module registers every op family it implements; see ``conv.py``, ``elementwise.py``,
``norm.py`` and ``passthrough.py``.
"""
from . import conv, elementwise, norm, passthrough  # noqa: F401
