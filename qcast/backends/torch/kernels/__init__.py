"""Int8 kernels, registered per (op, backend). See ``registry`` for the table and its kinds."""
from .registry import Kernel, backends, kernels, lookup, register

__all__ = ["Kernel", "register", "lookup", "kernels", "backends"]
