"""Absorb W_UV into the output side.

Before (v expanded from the latent for every cached token):
    v = heads(linear(c_kv, W_kv_b))                                       [B, H, T, d_v]
    o = split_rope_attention(q_latent, q_rope, c_kv, k_rope, v, ...)       [B, H, S, d_v]
    u = linear(merge_heads(o), W_O)
After, mode "reassociate" (W_UV applied per head to the latent output):
    o~ = split_rope_attention(q_latent, q_rope, c_kv, k_rope, c_kv, ...)   [B, H, S, d_c]
    o  = einsum("bhsc,hcv->bhsv", o~, W_UV^T)        W_UV^T [H, d_c, d_v]
After, mode "fold" (W_O,i W_UV,i precomputed in float64, rounded once):
    u = linear(merge_heads(o~), W_OV)                W_OV [d, H*d_c]

sum_j p_j (W_UV c_j) = W_UV (sum_j p_j c_j): the attention now reads only the latent.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import LINEAR, add_param, concrete, get_param, is_layout, layout_source, probe_heads_to_features
from .absorb_uk import up_projection
from .context import PassContext
from .manager import PassResult
from .split_rope_score import SPLIT_ATTENTION

aten = torch.ops.aten


def _output_projection(gm: fx.GraphModule, attn: fx.Node):
    """(o_proj node, layout chain attn -> o_proj input) when the output only feeds one linear."""
    chain, node = [], attn
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target is LINEAR and user.args[0] is node and get_param(gm, user.args[1]) is not None:
            return user, chain
        if not is_layout(user):
            return None
        chain.append(user)
        node = user
    return None


def absorb_uv(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    mode = (context or PassContext()).mode
    rewritten, folded, skipped = 0, 0, {}
    for node in list(gm.graph.nodes):
        if node.target is not SPLIT_ATTENTION:
            continue
        c_kv, v = node.args[2], node.args[4]
        up = up_projection(gm, v)
        if up is None or up.bias is not None:
            skipped[node.name] = "value is not a bias-free per-head slice of a linear"
            continue
        latent, w_v, _, vmap = up
        if layout_source(latent)[0] is not layout_source(c_kv)[0]:
            skipped[node.name] = "value does not come from the latent the keys read (absorb_uk first)"
            continue
        heads, d_v = vmap.shape
        d_c = w_v.shape[1]
        w_uv = w_v[vmap]  # [H, d_v, d_c]
        out_shape = concrete(tuple(node.meta["val"].shape))
        proj = _output_projection(gm, node) if mode == "fold" else None
        fmap = probe_heads_to_features(proj[1], out_shape) if proj is not None else None
        g = gm.graph
        anchor = node.next  # fx's inserting_after reverses a run of inserts; insert before the next node
        with g.inserting_before(anchor):
            latent_out = g.call_function(SPLIT_ATTENTION, (*node.args[:4], c_kv, *node.args[5:]))
        if fmap is not None:
            o_proj = proj[0]
            w_o = get_param(gm, o_proj.args[1])
            w_fold = torch.einsum("dhv,hvc->dhc", w_o.double()[:, fmap], w_uv.double())
            with g.inserting_before(anchor):
                batch = g.call_function(aten.sym_size.int, (latent_out, 0))
                merged = g.call_function(aten.reshape.default, (
                    g.call_function(aten.transpose.int, (latent_out, 1, 2)), [batch, -1, heads * d_c]))
                weight = add_param(gm, f"{node.name}_w_ov", w_fold.reshape(w_o.shape[0], -1).to(w_o.dtype),
                                   merged)
                fused = g.call_function(LINEAR, (merged, weight, *o_proj.args[2:]))
            o_proj.replace_all_uses_with(fused)
            folded += 1
        else:
            if mode == "fold":
                skipped[node.name] = "fold: output does not reach one linear through layout ops; reassociated"
            with g.inserting_before(anchor):
                weight = add_param(gm, f"{node.name}_w_uv_t", w_uv.transpose(1, 2), latent_out)
                out = g.call_function(aten.einsum.default, ("bhsc,hcv->bhsv", [latent_out, weight]))
            node.replace_all_uses_with(out)
        latent_out.meta["val"] = node.meta["val"].new_empty((*node.meta["val"].shape[:-1], d_c))
        rewritten += 1
    gm.graph.eliminate_dead_code()
    return PassResult(gm, rewritten > 0, {"rewritten": rewritten, "folded": folded, "skipped": skipped})
