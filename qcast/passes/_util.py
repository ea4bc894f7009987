from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


def call_sites(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each module path (a shared module cannot be rewritten per site)."""
    count: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            count[n.target] = count.get(n.target, 0) + 1
    return count


def set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def finish(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
