"""Turn the absorbed graph into a decode/step program over the latent cache.

Before (absorbed, no cache):
    forward(input_ids, position_ids) -> logits
    o~ = latent_attention(q_latent, q_rope, latent_kv_new, model_mask, s, causal)
After:
    forward(input_ids, position_ids, attention_mask, past_latent_0, ...) -> (logits, present_latent_0, ...)
    present_latent_i = cat([past_latent_i, latent_kv_new], dim=1)        [B, T_past + S, d_c + d_r]
    o~ = latent_attention(q_latent, q_rope, present_latent_i, padding_causal_mask, s, False)

The per-step work grows with T_past only inside latent_attention: nothing else reads the cache.
An empty past (T_past = 0) is valid, so this program alone can run a whole generation.
A sparse attention (its mask selects keys by a top-k, DSA) keeps its mask for add_index_cache, which runs next.
"""

from __future__ import annotations

import torch
from torch import fx

from ._inference import flat_signature, outputs, padding_causal_mask, placeholder, set_outputs
from ._key_selection import selects_keys
from .context import PassContext
from .manager import PassResult
from .to_latent_attention import LATENT_ATTENTION

aten = torch.ops.aten


def add_latent_cache(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    attentions = [n for n in gm.graph.nodes if n.target is LATENT_ATTENTION]
    if not attentions:
        raise ValueError("no latent_attention in the graph: run the absorb pipeline first")
    flat_signature(gm)
    logits = outputs(gm)
    input_ids = placeholder(gm, "input_ids")
    attention_mask = placeholder(gm, "attention_mask")
    pasts = [placeholder(gm, f"past_latent_{i}") for i in range(len(attentions))]
    windows = [s.window for s in context.analysis.sites] if context and context.analysis else [None] * len(pasts)
    presents = []
    for node, past, window in zip(attentions, pasts, windows, strict=True):
        sparse = selects_keys(node)
        mask = node.args[3] if sparse else padding_causal_mask(gm, input_ids, attention_mask, window)
        with gm.graph.inserting_before(node):
            present = gm.graph.call_function(aten.cat.default, ([past, node.args[2]], 1))
        node.args = (node.args[0], node.args[1], present, mask, node.args[4], False)
        presents.append(present)
    set_outputs(gm, [*logits, *presents])
    gm.graph.eliminate_dead_code()
    return PassResult(gm, True, {"layers": len(attentions)})
