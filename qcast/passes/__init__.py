"""Graph rewrites, one file each; each takes a GraphModule and edits it in place (on qcast's own copy)."""
from .fold_bn import fold_bn
from .fold_constants import fold_constants
from .fuse import fuse

__all__ = ["fold_bn", "fold_constants", "fuse"]
