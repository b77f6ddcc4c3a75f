"""Sparse MLA (DSA) in the step program: the indexer's keys cached beside the latent, the top-k taken over every
cached token, and the latent attention reading only the rows it selected.

Runs after add_latent_cache. Before (a layer whose attention mask a top-k builds, passes/_key_selection.py):
    keys  = indexer keys of the new tokens                                     [B, S, D_I]
    idx   = topk(scores(keys, model_mask), min(S, k)).indices
    o~    = latent_attention(q_latent, q_rope, present_latent, model_mask & scatter(idx), s, False)
After:
    present_index_keys_i = cat([past_index_keys_i, keys], 1)                     [B, T, D_I]
    values, idx = topk(cat([scores(present_index_keys_i, padding_causal_mask), -inf [B, S, k]], -1), k)
    valid = values != -inf                  (fewer than k attendable tokens: the padding columns are not valid)
    o~    = sparse_latent_attention(q_latent, q_rope, present_latent, where(valid, idx, 0), valid, s)

The scores' padding keeps the selection k wide whatever the cache holds (a fixed shape for kernels), and the
selected set equals HF's: its top-min(T, k) minus the tokens its mask hides. Layers that share one top-k
(GLM-5's shared indexers) share the cached keys, held with the first of them.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from mla_fx.errors import MLAFXError

from ._inference import outputs, padding_causal_mask, placeholder, set_outputs
from ._key_selection import KeySelection, cached_selections
from .context import PassContext
from .manager import PassResult
from .to_latent_attention import LATENT_ATTENTION

aten = torch.ops.aten
SPARSE_LATENT_ATTENTION = torch.ops.mla_fx.sparse_latent_attention.default


def add_index_cache(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    sites = (context or PassContext()).sites(gm).sites
    attentions = [n for n in gm.graph.nodes if n.target is LATENT_ATTENTION]
    selections = [s.selection for s in sites]
    if not any(isinstance(s, KeySelection) for s in selections):
        return PassResult(gm, False, {"layers": 0})
    unsupported = [f"{s.attention}: {s.selection}" for s in sites if isinstance(s.selection, str)]
    if unsupported or len(attentions) != len(sites):
        raise MLAFXError("the sparse attention's key selection is not understood: " + "; ".join(
            unsupported or [f"{len(attentions)} latent attentions for {len(sites)} MLA sites"]))
    g, by_name = gm.graph, {n.name: n for n in gm.graph.nodes}
    input_ids, attention_mask = placeholder(gm, "input_ids"), placeholder(gm, "attention_mask")
    mask = padding_causal_mask(gm, input_ids, attention_mask)
    for selection in {s.model_mask: s for s in selections if isinstance(s, KeySelection)}.values():
        by_name[selection.model_mask].replace_all_uses_with(mask)
    presents, rows = [], {}
    for layer, selection in cached_selections(sites).items():
        past = placeholder(gm, f"past_index_keys_{layer}")
        keys, reader = by_name[selection.keys], by_name[selection.keys_reader]
        with g.inserting_before(reader):
            present = g.call_function(aten.cat.default, ([past, keys], 1))
        reader.replace_input_with(keys, present)
        presents.append(present)
        rows[selection.topk] = _select(g, by_name[selection.topk], selection.top_k)
    for node, selection in zip(attentions, selections, strict=True):
        if isinstance(selection, KeySelection):
            q_latent, q_rope, latent_kv, _, scale, _ = node.args
            with g.inserting_before(node):
                new = g.call_function(SPARSE_LATENT_ATTENTION, (q_latent, q_rope, latent_kv, *rows[selection.topk],
                                                                scale))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
    set_outputs(gm, [*outputs(gm), *presents])
    g.eliminate_dead_code()
    return PassResult(gm, True, {"layers": sum(isinstance(s, KeySelection) for s in selections),
                                 "cached_keys": len(presents)})


def _select(g: fx.Graph, topk: fx.Node, k: int) -> tuple[fx.Node, fx.Node]:
    """(rows [B, S, k], valid [B, S, k]) from the top-k's scores over every cached token."""
    scores = topk.args[0]

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    with g.inserting_before(topk.next):
        batch, tokens = call(aten.sym_size.int, scores, 0), call(aten.sym_size.int, scores, 1)
        pad = call(aten.full.default, [batch, tokens, k], float("-inf"), dtype=scores.meta["val"].dtype)
        top = call(aten.topk.default, call(aten.cat.default, [scores, pad], -1), k)
        values, indices = call(operator.getitem, top, 0), call(operator.getitem, top, 1)
        valid = call(aten.ne.Scalar, values, float("-inf"))
        rows = call(aten.where.self, valid, indices, call(aten.zeros_like.default, indices))
    return rows, valid
