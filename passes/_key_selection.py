"""Sparse MLA (DeepSeek Sparse Attention): the top-k key selection of an MLA site, found by dataflow.

DeepSeek-V3.2's lightning indexer scores every key token for each query with small keys of its own
(index_head_dim values per token) and lets the attention read only the top-k tokens. In the captured graph:

    keys     = the indexer's keys, one row per token                          [B, S, D_I]
    scores   = relu(q_I @ keys^T) weighted over index heads, model mask -inf  [B, S, T]
    selected = topk(scores, min(top_k, T)).indices
    mask     = model_mask & scatter(selected)         the attention's mask    [B, 1, S, T]

A KeySelection names these nodes (computed once, with the sites) so that the inference programs can cache
the keys beside the latent and give the latent attention the selected rows instead of a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ._graph import LINEAR, SDPA

aten = torch.ops.aten
TOPK = aten.topk.default
MATMULS = {aten.matmul.default, aten.bmm.default}
# ops that mix values: a top-k behind one of them selects experts or computes scores; a top-k that reaches
# an attention mask without passing one selects the keys (DSA's lightning indexer)
MIXING = {LINEAR, SDPA, aten.mm.default, aten.einsum.default, *MATMULS}


@dataclass(frozen=True)
class KeySelection:
    topk: str  # aten.topk over the index scores [B, S, T]
    keys: str  # the indexer's keys [B, S, key_dim], one row per token: what a cache keeps
    keys_reader: str  # the node that reads the keys on their way to the scores
    model_mask: str  # the model's own mask [B, 1, S, T] (bool, True = attend): the indexer's and the attention's
    top_k: int
    key_dim: int


def attention_mask_arg(attn: fx.Node) -> fx.Node | None:
    mask = attn.args[3] if len(attn.args) > 3 else attn.kwargs.get("attn_mask")
    return mask if isinstance(mask, fx.Node) else None


def _selection_region(mask: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes the mask is computed from without passing a mixing op, and the top-ks among them."""
    frontier, seen = [mask], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.target not in MIXING and node.target is not TOPK:
            frontier.extend(node.all_input_nodes)
    return list(seen), [n for n in seen if n.target is TOPK]


def selects_keys(attn: fx.Node) -> bool:
    """Whether the attention's mask is built from a top-k's indices: sparse attention over selected keys."""
    mask = attention_mask_arg(attn)
    return mask is not None and bool(_selection_region(mask)[1])


def _top_k(topk: fx.Node) -> int | None:
    """k of topk(scores, min(T, k)) (a literal once the capture fixed it)."""
    k = topk.args[1]
    if isinstance(k, int):
        return k
    if isinstance(k, fx.Node) and k.op == "call_function":
        literals = [a for a in k.args if isinstance(a, int)]
        if getattr(k.target, "__name__", "") == "sym_min" and len(literals) == 1:
            return literals[0]
    return None


def find_key_selection(attn: fx.Node) -> KeySelection | str | None:
    """The attention's key selection, None for a dense attention, or why a sparse one is not understood."""
    mask = attention_mask_arg(attn)
    if mask is None:
        return None
    region, topks = _selection_region(mask)
    if not topks:
        return None
    if len(topks) != 1:
        return f"the mask is built from {len(topks)} top-ks, not one"
    (topk,) = topks
    if topk.kwargs or len(topk.args) > 2 and topk.args[2:] not in ((-1,), (-1, True), (-1, True, True)):
        return "the top-k is not over the last dim, largest first"
    top_k = _top_k(topk)
    if top_k is None:
        return f"the top-k's k ({topk.args[1]}) is neither a number nor min(tokens, number)"
    order = {n: i for i, n in enumerate(attn.graph.nodes)}
    after_topk = {topk}
    for node in sorted(region, key=order.__getitem__):
        if any(a in after_topk for a in node.all_input_nodes):
            after_topk.add(node)
    model_mask, node = None, mask
    while model_mask is None and node in after_topk:
        masks = [a for a in node.all_input_nodes if a not in after_topk and _is_boolean_mask(a)]
        if masks:
            model_mask = masks[0]
        else:
            inputs = [a for a in node.all_input_nodes if a in after_topk]
            node = inputs[0] if inputs else None
    if model_mask is None:
        return "the mask does not combine the model's boolean mask with the top-k (an additive mask?)"
    found = _keys(topk.args[0], attn)
    if isinstance(found, str):
        return found
    keys, reader = found
    return KeySelection(topk.name, keys.name, reader.name, model_mask.name, top_k, int(keys.meta["val"].shape[-1]))


def _is_boolean_mask(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 4


def _keys(scores: fx.Node, attn: fx.Node) -> tuple[fx.Node, fx.Node] | str:
    """Follow the scores' key axis back (a matmul's second operand, any other op's first input) to the first
    tensor [B, S, D] with one row per token: the indexer's keys."""
    query = attn.args[0].meta["val"].shape
    batch, tokens = str(query[0]), str(query[2])
    node, reader = scores, None
    for _ in range(64):
        dims = node.meta["val"].shape if isinstance(node.meta.get("val"), torch.Tensor) else ()
        if (len(dims) == 3 and (str(dims[0]), str(dims[1])) == (batch, tokens)
                and not isinstance(dims[2], torch.SymInt) and reader is not None):
            return node, reader
        source = node.args[1] if node.target in MATMULS else (node.args[0] if node.args else None)
        if not isinstance(source, fx.Node) or node.op != "call_function":
            break
        node, reader = source, node
    return "no per-token key tensor [batch, tokens, dim] found behind the index scores"


def cached_selections(sites) -> dict[int, KeySelection]:
    """The key selections whose keys a cache keeps, by the first MLA site (layer) that reads them: a top-k that
    several layers share (GLM-5's shared indexers) is cached once, with the first of them."""
    first: dict[str, int] = {}
    for i, site in enumerate(sites):
        if isinstance(site.selection, KeySelection):
            first.setdefault(site.selection.topk, i)
    return {i: sites[i].selection for i in sorted(first.values())}
