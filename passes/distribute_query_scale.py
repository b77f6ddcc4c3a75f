"""Canonicalize: a scale on the concatenated query moves onto its parts.

Mistral 4 (Llama-4 attention scaling) multiplies the whole query [q_nope ; q_rope] by a per-position
factor after the concatenation. The factor is constant along the head dim, so

Before:
    q = cat([q_nope, q_rope], -1) * s          # s [..., 1] (or a number)
After:
    q = cat([q_nope * s, q_rope * s], -1)

which is the same values, and the [nope ; rope] query the site matcher looks for; absorption then
carries s on both parts (W_UK is linear, so (s q_nope) W_UK = s (q_nope W_UK)).
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import SDPA, last_dim_parts
from .context import PassContext
from .manager import PassResult

aten = torch.ops.aten


def _constant_along_last_dim(factor) -> bool:
    if isinstance(factor, (int, float)):
        return True
    val = factor.meta.get("val") if isinstance(factor, fx.Node) else None
    return val is not None and (val.dim() == 0 or val.shape[-1] == 1)


def distribute_query_scale(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    g = gm.graph
    moved = 0
    for attn in [n for n in g.nodes if n.target is SDPA]:
        q = attn.args[0]
        if q.target is not aten.mul.Tensor:
            continue
        a, b = q.args
        concat, factor = (a, b) if isinstance(a, fx.Node) and a.target is aten.cat.default else (b, a)
        if not (isinstance(concat, fx.Node) and concat.target is aten.cat.default and last_dim_parts(concat)
                and _constant_along_last_dim(factor)):
            continue
        with g.inserting_before(q):
            parts = [g.call_function(aten.mul.Tensor, (part, factor)) for part in concat.args[0]]
            factor_val = factor.meta["val"] if isinstance(factor, fx.Node) else factor
            for part, src in zip(parts, concat.args[0], strict=True):
                part.meta["val"] = src.meta["val"] * factor_val  # fake tensors: shape and dtype only
            scaled = g.call_function(aten.cat.default, (parts, *concat.args[1:]))
            scaled.meta.update(q.meta)
        q.replace_all_uses_with(scaled)
        g.erase_node(q)
        moved += 1
    if moved:
        g.eliminate_dead_code()
        g.lint()
        gm.recompile()
    return PassResult(gm, bool(moved), {"query_scales_moved": moved})
