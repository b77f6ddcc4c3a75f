"""Turn the captured (un-absorbed) graph into a prefill program that fills the latent cache.

Prefill is compute-bound: for a prompt with no cached prefix, attention with the original head sizes
over K/V expanded from the latent costs fewer FLOPs than the absorbed MQA (see mla_fx.cost). So the
MLA attention stays as the model wrote it, and the program also returns the latent rows to cache.

Before:
    forward(input_ids, position_ids) -> logits
    o = scaled_dot_product_attention(q, k, v, model_mask)
After:
    forward(input_ids, position_ids, attention_mask) -> (logits, present_latent_0, ...)
    o = scaled_dot_product_attention(q, k, v, padding_causal_mask)
    present_latent_i = cat([c_kv, k_rope], -1)                    [B, S, d_c + d_r]

present_latent_i is the same row the step program appends: normalized c_KV and k_R after RoPE.

A sparse attention (DSA, passes/_key_selection.py) keeps its top-k mask, with the model's mask under it replaced by
the padding-causal one, and the program also returns the indexer's keys (present_index_keys_i [B, S, D_I]) for the
layers add_index_cache caches them with.
"""

from __future__ import annotations

import torch
from torch import fx

from mla_fx.errors import NoMLAError

from ._graph import last_dim_parts, shape, strip_expand
from ._inference import flat_signature, outputs, padding_causal_mask, placeholder, set_outputs
from ._key_selection import KeySelection, cached_selections
from .context import PassContext
from .find_mla_sites import no_mla_message
from .manager import PassResult
from .split_rope_score import sdpa_arguments

aten = torch.ops.aten


def add_prefill_cache(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    analysis = (context or PassContext()).sites(gm)
    sites = analysis.sites
    if not sites:
        raise NoMLAError(no_mla_message(analysis.rejected, gm))
    by_name = {n.name: n for n in gm.graph.nodes}
    flat_signature(gm)
    logits = outputs(gm)
    input_ids = placeholder(gm, "input_ids")
    attention_mask = placeholder(gm, "attention_mask")
    attentions = [by_name[s.attention] for s in sites]
    mask = padding_causal_mask(gm, input_ids, attention_mask)  # every sparse layer's (none has a window)
    selections = [s.selection for s in sites if isinstance(s.selection, KeySelection)]
    for model_mask in {s.model_mask for s in selections}:
        by_name[model_mask].replace_all_uses_with(mask)
    g, presents = gm.graph, []
    for site, node in zip(sites, attentions, strict=True):
        a = sdpa_arguments(node)
        (_, _, k_nope), (_, _, k_rope) = last_dim_parts(a["key"])
        k_rope = strip_expand(k_rope)
        latent = by_name[site.labels["latent"]]
        d_c, d_r = shape(latent)[-1], shape(k_rope)[-1]
        with g.inserting_before(node):
            batch = g.call_function(aten.sym_size.int, (a["query"], 0))
            rows = [g.call_function(aten.reshape.default, (latent, [batch, -1, d_c])),
                    g.call_function(aten.reshape.default, (k_rope, [batch, -1, d_r]))]
            presents.append(g.call_function(aten.cat.default, (rows, -1)))
        sparse = isinstance(site.selection, KeySelection)
        own = mask if site.window is None else padding_causal_mask(gm, input_ids, attention_mask, site.window)
        node.args = (a["query"], a["key"], a["value"], a["attn_mask"] if sparse else own)
        node.kwargs = {"scale": a["scale"], "is_causal": False, "dropout_p": 0.0}
    index_keys = [by_name[s.keys] for s in cached_selections(sites).values()]
    set_outputs(gm, [*logits, *presents, *index_keys])
    g.eliminate_dead_code()
    return PassResult(gm, True, {"layers": len(sites)})
