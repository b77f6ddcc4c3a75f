"""Canonicalize: a query that is one tensor is split where its key is assembled.

MLA models without RoPE on the query side (Kimi Linear's MLA layers use no positional encoding)
still build the key as [k_nope ; k_rope] from the latent's two parts, but pass the query as one
projection. Splitting it at the key's boundary

Before:
    sdpa(q, cat([k_nope, k_rope], -1), v)
After:
    sdpa(cat([q[..., :d_nope], q[..., d_nope:]], -1), cat([k_nope, k_rope], -1), v)

leaves the values unchanged and gives the [q_nope ; q_rope] query the site matcher looks for.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import SDPA, last_dim_parts
from .context import PassContext
from .manager import PassResult

aten = torch.ops.aten


def split_query_like_key(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    g = gm.graph
    split = 0
    for attn in [n for n in g.nodes if n.target is SDPA]:
        q, k = attn.args[:2]
        key_parts = last_dim_parts(k)
        if last_dim_parts(q) or not key_parts or len(key_parts) != 2:
            continue
        q_val = q.meta.get("val")
        width = key_parts[-1][1]
        if q_val is None or q_val.shape[-1] != width:
            continue
        with g.inserting_after(q):
            parts = []
            for start, end, _ in key_parts:
                part = g.call_function(aten.slice.Tensor, (q, -1, start, end))
                part.meta["val"] = q_val[..., start:end]
                parts.append(part)
        with g.inserting_before(attn):
            joined = g.call_function(aten.cat.default, (parts, -1))
            joined.meta["val"] = q_val
        attn.replace_input_with(q, joined)
        split += 1
    if split:
        g.lint()
        gm.recompile()
    return PassResult(gm, bool(split), {"queries_split": split})
