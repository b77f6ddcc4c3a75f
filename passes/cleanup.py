"""Cleanup: dead code, weights no node reads any more (the expanded kv_b, the unfused W_O), lint."""

from __future__ import annotations

from torch import fx

from .context import PassContext
from .manager import PassResult


def count_params(gm: fx.GraphModule) -> int:
    return sum(p.numel() for p in gm.parameters()) + sum(b.numel() for b in gm.buffers())


def cleanup(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    before_nodes, before_params = len(gm.graph.nodes), count_params(gm)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            delattr(owner, leaf)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True, {"nodes_removed": before_nodes - len(gm.graph.nodes),
                                 "params_before": before_params, "params_after": count_params(gm)})
