"""Turn the absorbed attention into MQA over the latent cache row.

Before (both k_nope and v are the latent c_KV, one head):
    o~ = split_rope_attention(q_latent, q_rope, c_kv, k_rope, c_kv, mask, s, causal)
After:
    latent_kv = cat([c_kv[B,T,d_c], k_rope[B,T,d_r]], -1)                  [B, T, d_c + d_r]
    o~ = mla_fx.latent_attention(q_latent, q_rope, latent_kv, mask, s, causal)

latent_kv is exactly what a decode cache holds per token and layer: the normalized c_KV and k_R
after RoPE, 576 values at DeepSeek-V3 sizes.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import layout_source, shape
from .context import PassContext
from .manager import PassResult
from .split_rope_score import SPLIT_ATTENTION

aten = torch.ops.aten
LATENT_ATTENTION = torch.ops.mla_fx.latent_attention.default


def to_latent_attention(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    rewritten, skipped = 0, {}
    g = gm.graph
    for node in list(g.nodes):
        if node.target is not SPLIT_ATTENTION:
            continue
        q_latent, q_rope, c_kv, k_rope, v, mask, scale, causal = node.args
        if v is not c_kv:
            skipped[node.name] = "keys and values are not the same latent (run absorb_uk and absorb_uv first)"
            continue
        d_c = shape(layout_source(c_kv)[0])[-1]
        d_r = shape(k_rope)[-1]
        with g.inserting_before(node):
            batch = g.call_function(aten.sym_size.int, (q_rope, 0))
            rows = [g.call_function(aten.reshape.default, (c_kv, [batch, -1, d_c])),
                    g.call_function(aten.reshape.default, (k_rope, [batch, -1, d_r]))]
            latent_kv = g.call_function(aten.cat.default, (rows, -1))
            new = g.call_function(LATENT_ATTENTION, (q_latent, q_rope, latent_kv, mask, scale, causal))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        rewritten += 1
    g.eliminate_dead_code()
    return PassResult(gm, rewritten > 0, {"rewritten": rewritten, "skipped": skipped})
