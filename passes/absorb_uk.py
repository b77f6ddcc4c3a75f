"""Absorb W_UK into the query side.

Before (k_nope expanded from the latent for every cached token):
    k_nope = heads(linear(c_kv, W_kv_b))                                  [B, H, T, d_nope]
    o = split_rope_attention(q_nope, q_rope, k_nope, k_rope, v, ...)
After, mode "reassociate" (W_UK applied to the queries at run time, as DeepSeek/vLLM/SGLang do):
    q_latent = einsum("bhsn,hnc->bhsc", q_nope, W_UK)   W_UK [H, d_nope, d_c]     [B, H, S, d_c]
    o = split_rope_attention(q_latent, q_rope, c_kv[B,1,T,d_c], k_rope, v, ...)
After, mode "fold" (W_UK^T W_UQ precomputed in float64, rounded once):
    q_latent = heads(linear(c_q, W_UQK))             W_UQK [H*d_c, d_q]

q_nope.(W_UK c) = (W_UK^T q_nope).c, so the score is unchanged and k_nope is never materialised.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import fx

from ._graph import LINEAR, add_param, get_param, probe_features, scalar_factor, scaled_layout_source
from .context import PassContext
from .manager import PassResult
from .split_rope_score import SPLIT_ATTENTION

aten = torch.ops.aten


class UpProjection(NamedTuple):
    """node = c * heads(linear(input, weight, bias)): features[h, d] is the feature row of head h, position d."""

    input: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    features: torch.Tensor  # [H, D] row indices into weight


def up_projection(gm: fx.GraphModule, node: fx.Node) -> UpProjection | None:
    """The per-head linear `node` slices, if it is c * heads(linear(x, W)), else None.

    A constant factor c (LongCat-Flash scales q) is folded into the returned weight and bias.
    """
    src, chain, factor = scaled_layout_source(node)
    if src.target is not LINEAR:
        return None
    weight = get_param(gm, src.args[1])
    bias_node = src.args[2] if len(src.args) > 2 else None
    bias = get_param(gm, bias_node) if bias_node is not None else None
    feature_map = probe_features(src, chain)
    if weight is None or feature_map is None or (bias_node is not None and bias is None):
        return None
    if factor != 1.0:
        weight, bias = weight * factor, (bias * factor if bias is not None else None)
    return UpProjection(src.args[0], weight, bias, feature_map)


def heads_view(graph: fx.Graph, flat: fx.Node, batch: fx.Node, heads: int, dim: int) -> fx.Node:
    """[B, S, H*D] (or any leading dims that flatten to B, S) -> [B, H, S, D]."""
    split = graph.call_function(aten.reshape.default, (flat, [batch, -1, heads, dim]))
    return graph.call_function(aten.transpose.int, (split, 1, 2))


def _narrow_siblings(gm: fx.GraphModule, q_nope: fx.Node, c_q: fx.Node) -> None:
    """Fold makes the W_UQ rows of a fused q projection dead; give the q_rope rows a linear of their own.

    q_nope = split(heads(linear(c_q, W_q)))[0]; its sibling split outputs read only their own rows.
    """
    while scalar_factor(q_nope) is not None:
        q_nope = q_nope.args[0]
    split = q_nope.args[0] if q_nope.target is operator.getitem else None
    if split is None:
        return
    for sibling in [u for u in split.users if u is not q_nope]:
        up = up_projection(gm, sibling)
        if up is None or up.input is not c_q or up.bias is not None:
            continue
        heads, dim = up.features.shape
        g = gm.graph
        with g.inserting_before(sibling):
            batch = g.call_function(aten.sym_size.int, (c_q, 0))
            weight = add_param(gm, f"{sibling.name}_w", up.weight[up.features].reshape(heads * dim, -1), sibling)
            narrow = heads_view(g, g.call_function(LINEAR, (c_q, weight)), batch, heads, dim)
        sibling.replace_all_uses_with(narrow)


def absorb_uk(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    mode = (context or PassContext()).mode
    rewritten, skipped, folded = 0, {}, 0
    for node in list(gm.graph.nodes):
        if node.target is not SPLIT_ATTENTION:
            continue
        q_nope, _, k_nope = node.args[:3]
        up = up_projection(gm, k_nope)
        if up is None or up.bias is not None:
            skipped[node.name] = "k_nope is not a bias-free per-head slice of a linear over the latent"
            continue
        latent, w_kv, _, kmap = up
        heads, d_nope = kmap.shape
        d_c = w_kv.shape[1]
        w_uk = w_kv[kmap]  # [H, d_nope, d_c]
        g = gm.graph
        with g.inserting_before(node):
            batch = g.call_function(aten.sym_size.int, (node.args[1], 0))
            q_up = up_projection(gm, q_nope) if mode == "fold" else None
            if q_up is not None:
                c_q, w_q, b_q, qmap = q_up
                w_uk64 = w_uk.double()
                w_fold = torch.einsum("hnc,hnq->hcq", w_uk64, w_q.double()[qmap]).reshape(heads * d_c, -1)
                weight = add_param(gm, f"{node.name}_w_uqk", w_fold.to(w_q.dtype), node)
                args = (c_q, weight)
                if b_q is not None:
                    b_fold = torch.einsum("hnc,hn->hc", w_uk64, b_q.double()[qmap]).reshape(-1)
                    args += (add_param(gm, f"{node.name}_b_uqk", b_fold.to(b_q.dtype), node),)
                q_latent = heads_view(g, g.call_function(LINEAR, args), batch, heads, d_c)
                _narrow_siblings(gm, q_nope, c_q)
                folded += 1
            else:
                if mode == "fold":
                    skipped[node.name] = "fold: q_nope is not a per-head slice of a linear; reassociated"
                weight = add_param(gm, f"{node.name}_w_uk", w_uk, node)
                # per-head weights [H, d_nope, d_c]: einsum runs as one bmm over heads, with no per-batch copy
                q_latent = g.call_function(aten.einsum.default, ("bhsn,hnc->bhsc", [q_nope, weight]))
            c_kv = g.call_function(aten.reshape.default, (latent, [batch, 1, -1, d_c]))
        node.args = (q_latent, node.args[1], c_kv, *node.args[3:])
        rewritten += 1
    gm.graph.eliminate_dead_code()
    return PassResult(gm, rewritten > 0, {"rewritten": rewritten, "folded": folded, "skipped": skipped})
