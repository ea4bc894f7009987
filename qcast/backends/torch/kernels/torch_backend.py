"""The ``torch`` backend: PyTorch's own int8 CPU kernels (nothing extra to install).

Importing this module registers every op family it implements; see ``conv.py``, ``conv_transpose.py``,
``elementwise.py``, ``norm.py``, ``passthrough.py``, ``attention.py``, ``transformer.py``, ``dynamic.py``,
``recurrent.py`` and ``embedding_bag.py``.
"""
from . import (attention, conv, conv_transpose, dynamic, elementwise, embedding_bag, norm,  # noqa: F401
               passthrough, recurrent, transformer)
