"""Split the decoupled-RoPE score term out of the attention.

Before:
    q = [q_nope ; q_rope]            (cat, last dim)
    k = [k_nope ; expand(k_rope)]    (cat or new_empty + slice_scatter, last dim)
    o = aten.scaled_dot_product_attention(q, k, v, mask, scale=s)
After:
    o = mla_fx.split_rope_attention(q_nope, q_rope, k_nope, k_rope, v, mask, s, is_causal)

score = q_nope.k_nope + q_rope.k_rope, identical to q.k; the shared k_rope is no longer broadcast
to every head. Only attentions that find_mla_sites accepts are rewritten.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ._graph import SDPA, last_dim_parts, strip_expand
from .context import PassContext
from .manager import PassResult

SPLIT_ATTENTION = torch.ops.mla_fx.split_rope_attention.default


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    return {**defaults, **dict(zip(names, node.args, strict=False)), **node.kwargs}


def split_rope_score(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    analysis = (context or PassContext()).sites(gm)
    sites = {s.attention: s for s in analysis.sites}
    rewritten, skipped = 0, {}
    for node in list(gm.graph.nodes):
        if node.target is not SDPA:
            continue
        site = sites.get(node.name) or analysis.rejected.get(node.name, "not an MLA site")
        a = sdpa_arguments(node)
        if isinstance(site, str) or a["dropout_p"] != 0.0:
            skipped[node.name] = site if isinstance(site, str) else "dropout_p != 0"
            continue
        (_, _, q_nope), (_, _, q_rope) = last_dim_parts(a["query"])
        (_, _, k_nope), (_, _, k_rope) = last_dim_parts(a["key"])
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(SPLIT_ATTENTION, (
                q_nope, q_rope, k_nope, strip_expand(k_rope), a["value"], a["attn_mask"],
                float(site.spec.softmax_scale), bool(a["is_causal"])))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten += 1
    gm.graph.eliminate_dead_code()
    return PassResult(gm, rewritten > 0, {"rewritten": rewritten, "skipped": skipped})
