"""Graph rewrites, one file each; each takes a GraphModule and edits it in place (on qcast's own copy)."""
from .equalize import equalize
from .fold_bn import fold_bn
from .fold_constants import fold_constants
from .fuse import fuse

__all__ = ["equalize", "fold_bn", "fold_constants", "fuse"]
