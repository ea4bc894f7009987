"""The ``torch`` backend: PyTorch's own int8 CPU kernels (nothing extra to install).

Importing this module registers every op family it implements; see ``conv.py``, ``conv_transpose.py``, ``elementwise.py``,
``norm.py``, ``passthrough.py``, ``attention.py``, ``transformer.py`` and ``dynamic.py``.
"""
from . import attention, conv, conv_transpose, dynamic, elementwise, norm, passthrough, transformer  # noqa: F401
