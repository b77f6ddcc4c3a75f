"""Find MLA sites by dataflow, not by names.

An MLA site is an attention (SDPA) whose
- query is [q_nope ; q_rope] and key is [k_nope ; k_rope] along the head dim, k_rope shared by heads,
- k_nope and v are per-head slices of linear(s) over one latent tensor c_KV (the kv up-projection),
- output reaches a linear (the output projection) through layout ops.
Names and nn_module_stack are used only to label the report. When nothing matches, the error says
what was looked for and why each attention found was rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from mla_fx.errors import NoMLAError
from mla_fx.spec import MLASpec

from ._graph import (
    LINEAR,
    SDPA,
    last_dim_parts,
    layout_source,
    probe_features,
    scaled_layout_source,
    shape,
    strip_expand,
)
from ._key_selection import KeySelection, find_key_selection
from .context import PassContext
from .manager import PassResult

LOOKED_FOR = ("an attention (scaled_dot_product_attention) whose query and key are [nope ; rope] "
              "concatenations with a key rope part shared by all heads, and whose key-nope part and "
              "value are per-head slices of a linear over one latent tensor (c_KV)")


@dataclass
class MLASite:
    attention: str
    module: str
    spec: MLASpec
    kv_up_weight: str
    labels: dict[str, str] = field(default_factory=dict)
    # sparse attention (DSA): the top-k key selection, or why a top-k-masked attention is not understood
    selection: KeySelection | str | None = None
    # a sliding-window layer's window (config layer_types): the inference programs' masks keep it
    window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"attention": self.attention, "module": self.module, "kv_up_weight": self.kv_up_weight,
               "spec": self.spec.to_dict()}
        if isinstance(self.selection, KeySelection):
            out["sparse"] = {"top_k": self.selection.top_k, "index_key_dim": self.selection.key_dim}
        return out


def _linear_source(node: fx.Node):
    src, chain, _ = scaled_layout_source(node)
    if src.target is not LINEAR or src.args[1].op != "get_attr":
        return None
    return src, chain


def _module_label(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _rope_layout(k_rope: fx.Node, depth: int = 12) -> str:
    """Hint for reports: which RoPE variant produced k_rope (interleaved slices, complex, rotate-half)."""
    seen, frontier = set(), [k_rope]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            name = str(n.target)
            if "view_as_complex" in name or "polar" in name:
                return "complex"
            if name == "aten.slice.Tensor" and len(n.args) > 4 and n.args[4] == 2:
                return "interleaved"  # x[..., 0::2], x[..., 1::2]
            if name in ("aten.unbind.int", "aten.stack.default") and n.args[1:2] == (-1,):
                return "interleaved"  # pairs as a trailing dim of 2
            nxt += [a for a in n.all_input_nodes if a not in seen]
            seen.update(nxt)
        frontier = nxt
    return "rotate_half"


def match_site(attn: fx.Node) -> MLASite | str:
    """An MLASite for this attention node, or the reason it is not one."""
    q, k, v = attn.args[:3]
    qp, kp = last_dim_parts(q), last_dim_parts(k)
    if not qp or len(qp) != 2:
        return "query is not [q_nope ; q_rope] (no decoupled RoPE part)"
    if not kp or len(kp) != 2:
        return "key is not [k_nope ; k_rope] (no decoupled RoPE part)"
    if [(s, e) for s, e, _ in qp] != [(s, e) for s, e, _ in kp]:
        return "query and key split the head dim differently"
    (_, d_nope, _), (_, d_qk, q_rope) = qp
    k_nope, k_rope = kp[0][2], strip_expand(kp[1][2])
    if len(shape(k_rope)) == 4 and shape(k_rope)[1] != 1:
        return "k_rope is not shared by all heads"
    up_k, up_v = _linear_source(k_nope), _linear_source(v)
    if up_k is None:
        return "k_nope is not a layout view of a linear over a latent"
    if up_v is None:
        return "value is not a layout view of a linear over a latent"
    map_k, map_v = probe_features(*up_k), probe_features(*up_v)
    if map_k is None or map_v is None:
        return "k_nope/value are not per-head, per-token slices of the up-projection"
    latent_k, latent_v = layout_source(up_k[0].args[0])[0], layout_source(up_v[0].args[0])[0]
    if latent_k is not latent_v:
        return "k_nope and value come from different tensors (not one latent c_KV)"
    heads, d_c = map_k.shape[0], shape(up_k[0].args[1])[1]
    q_src = _linear_source(qp[0][2])
    d_q = shape(q_src[0].args[1])[1] if q_src else None
    out = attn
    while len(out.users) == 1 and next(iter(out.users)).target is not LINEAR:
        out = next(iter(out.users))
    o_proj = next(iter(out.users)) if len(out.users) == 1 else None
    hidden = shape(o_proj.args[1])[0] if o_proj is not None and o_proj.target is LINEAR else None
    scale = attn.kwargs.get("scale") or (attn.args[6] if len(attn.args) > 6 else None)
    spec = MLASpec(
        n_heads=heads,
        q_lora_rank=d_q if d_q is not None and d_q != hidden else None,
        kv_lora_rank=d_c,
        qk_nope_head_dim=d_nope,
        qk_rope_head_dim=d_qk - d_nope,
        v_head_dim=map_v.shape[1],
        softmax_scale=float(scale) if scale is not None else d_qk ** -0.5,
        rope_layout=_rope_layout(k_rope),
        hidden_size=hidden,
    )
    return MLASite(attn.name, _module_label(attn), spec, up_k[0].args[1].target,
                   {"q_rope": q_rope.name, "k_rope": k_rope.name, "latent": latent_k.name},
                   find_key_selection(attn))


def find_sites(gm: fx.GraphModule) -> tuple[list[MLASite], dict[str, str]]:
    """All MLA sites in graph order, and the reason each other attention was rejected."""
    sites, rejected = [], {}
    for node in gm.graph.nodes:
        if node.target is SDPA:
            found = match_site(node)
            if isinstance(found, MLASite):
                sites.append(found)
            else:
                rejected[node.name] = found
    return sites, rejected


def no_mla_message(rejected: dict[str, str], gm: fx.GraphModule | None = None) -> str:
    if gm is not None and any(n.target is torch.ops.mla_fx.latent_attention.default for n in gm.graph.nodes):
        return ("this program is already absorbed: its attention is mla_fx::latent_attention over the latent "
                "cache. Give mla-fx the original model")
    if not rejected:
        found = "no scaled_dot_product_attention at all"
    else:
        found = "; ".join(f"{name}: {why}" for name, why in rejected.items())
    return f"no Multi-head Latent Attention found. Looked for {LOOKED_FOR}. Found: {found}."


def find_mla_sites(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    """Analysis pass: fails with NoMLAError when the model has no MLA; stats list the sites (those the context
    hands in, computed once before the pipeline, or the graph's when run alone)."""
    analysis = (context or PassContext()).sites(gm)
    if not analysis.sites:
        raise NoMLAError(no_mla_message(analysis.rejected, gm))
    return PassResult(gm, False, {"sites": len(analysis.sites), "rejected": analysis.rejected,
                                  "specs": [s.to_dict() for s in analysis.sites]})
