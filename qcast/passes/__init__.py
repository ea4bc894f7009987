"""Graph rewrites, one file each; each takes a GraphModule and edits it in place (on qcast's own copy)."""
from .decompose_sdpa import decompose_sdpa, decomposed_ops
from .equalize import equalize
from .fold_bn import fold_bn
from .fold_constants import fold_constants
from .functional_layers import functional_layers
from .fuse import fuse

__all__ = ["decompose_sdpa", "decomposed_ops", "equalize", "fold_bn", "fold_constants", "functional_layers", "fuse"]
