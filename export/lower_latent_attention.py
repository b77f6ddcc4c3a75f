"""Lower mla_fx::latent_attention for ONNX export.

attention="custom" (default):
    o~ = torch.onnx.ops.symbolic("mla_fx::LatentAttention", (q_latent, q_rope, latent_kv, mask),
                                 {scale, kv_lora_rank, rope_dim, plugin_namespace})
attention="standard" (the ONNX Attention op, opset 23, one KV head):
    o~ = scaled_dot_product_attention([q_latent ; q_rope], row[:, None], row[:, None, :, :d_c], mask,
                                      scale, enable_gqa=True)
mla_fx::sparse_latent_attention (DSA) becomes the node mla_fx::SparseLatentAttention (q_latent, q_rope,
latent_kv, indices, valid) {scale, kv_lora_rank, rope_dim}, whose function body ONNX Runtime runs, with either.
The op must carry an explicit mask (add_latent_cache gives it one); is_causal is never exported.
Needs concrete shapes in node.meta["tensor_meta"] (torch.fx.passes.shape_prop.ShapeProp).
"""

from __future__ import annotations

import torch
from torch import fx

from mla_fx.passes.add_index_cache import SPARSE_LATENT_ATTENTION
from mla_fx.passes.context import PassContext
from mla_fx.passes.manager import PassResult
from mla_fx.passes.to_latent_attention import LATENT_ATTENTION

from .latent_attention_onnx import DOMAIN, OP_TYPE, OPSET_VERSION, SPARSE_OP_TYPE, attributes

aten = torch.ops.aten
ATTENTION_KINDS = ("custom", "standard")


def lower_latent_attention(attention: str):
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, not {attention!r}")

    def lower_latent_attention(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
        g = gm.graph
        lowered = 0
        for node in list(g.nodes):
            if node.target is SPARSE_LATENT_ATTENTION:
                _lower_sparse(g, node)
                lowered += 1
                continue
            if node.target is not LATENT_ATTENTION:
                continue
            q_latent, q_rope, row, mask, scale, is_causal = node.args
            if mask is None or is_causal:
                raise ValueError(f"{node.name}: export needs an explicit mask (run add_latent_cache first)")
            d_c, d_r = q_latent.meta["tensor_meta"].shape[-1], q_rope.meta["tensor_meta"].shape[-1]
            with g.inserting_before(node):
                if attention == "custom":
                    shape = [g.call_function(aten.sym_size.int, (q_latent, i)) for i in range(4)]
                    new = g.call_function(torch.onnx.ops.symbolic, (
                        f"{DOMAIN}::{OP_TYPE}", (q_latent, q_rope, row, mask), attributes(scale, d_c, d_r)),
                        {"dtype": q_latent.meta["tensor_meta"].dtype, "shape": shape, "version": OPSET_VERSION})
                else:
                    q = g.call_function(aten.cat.default, ([q_latent, q_rope], -1))
                    k = g.call_function(aten.unsqueeze.default, (row, 1))
                    v = g.call_function(aten.slice.Tensor, (k, 3, 0, d_c))
                    new = g.call_function(aten.scaled_dot_product_attention.default, (q, k, v, mask),
                                          {"scale": scale, "enable_gqa": True})
            node.replace_all_uses_with(new)
            g.erase_node(node)
            lowered += 1
        return PassResult(gm, lowered > 0, {"lowered": lowered, "attention": attention})

    return lower_latent_attention


def _lower_sparse(g: fx.Graph, node: fx.Node) -> None:
    q_latent, q_rope, row, indices, valid, scale = node.args
    d_c, d_r = q_latent.meta["tensor_meta"].shape[-1], q_rope.meta["tensor_meta"].shape[-1]
    with g.inserting_before(node):
        shape = [g.call_function(aten.sym_size.int, (q_latent, i)) for i in range(4)]
        new = g.call_function(torch.onnx.ops.symbolic, (
            f"{DOMAIN}::{SPARSE_OP_TYPE}", (q_latent, q_rope, row, indices, valid), attributes(scale, d_c, d_r, True)),
            {"dtype": q_latent.meta["tensor_meta"].dtype, "shape": shape, "version": OPSET_VERSION})
    node.replace_all_uses_with(new)
    g.erase_node(node)
