"""Helpers for the passes that turn a captured model into inference programs with a latent cache."""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten
PADDING_CAUSAL_MASK = "mla_fx_padding_causal_mask"  # node.meta key of the mask padding_causal_mask made


def flat_signature(gm: fx.GraphModule) -> None:
    """Drop the pytree calling convention of `ExportedProgram.module()`: inputs and outputs become flat,
    so passes can add cache inputs and outputs."""
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()  # ExportedProgram.module() checks inputs against the old tree spec
    gm.recompile()


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """Find or append a graph input."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in inputs:
        if node.name == name:
            return node
    with gm.graph.inserting_after(inputs[-1]):
        node = gm.graph.placeholder(name)
    if node.name != name:
        raise ValueError(f"input name {name!r} is taken in the graph (got {node.name!r})")
    return node


def set_outputs(gm: fx.GraphModule, values: list[fx.Node]) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(values),)


def outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def padding_causal_mask(gm: fx.GraphModule, input_ids: fx.Node, attention_mask: fx.Node,
                        window: int | None = None) -> fx.Node:
    """mask [B, 1, S, T] (True = attend) for S new tokens after T - S cached ones.

    Query i sits at cache row T - S + i; it sees rows j <= T - S + i whose attention_mask is 1 (padding
    rows are 0); with a sliding `window`, only rows j > T - S + i - window (HF's sliding_window). It always
    sees its own row, so a padding query never has an empty row (an all-masked softmax is NaN in ONNX
    Runtime, and NaN would leak into the cache). The mask never relies on an
    `is_causal` flag, whose alignment differs between ONNX releases and runtimes.
    """
    g = gm.graph
    made = [n for n in g.nodes if n.meta.get(PADDING_CAUSAL_MASK, False) == (True, window)]
    if made:  # one per program and window: the passes that need it share it
        return made[0]

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    last_input = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_before(last_input.next):  # before every reader: the model's own mask is computed early
        s = call(aten.sym_size.int, input_ids, 1)
        t = call(aten.sym_size.int, attention_mask, 1)
        rows = call(aten.arange.start, call(operator.sub, t, s), t, dtype=torch.int64)
        cols = call(aten.arange.default, t, dtype=torch.int64)
        query_row = call(aten.unsqueeze.default, rows, 1)  # [S, 1]
        causal = call(aten.le.Tensor, cols, query_row)  # [S, T]
        if window is not None:
            causal = call(aten.logical_and.default, causal,
                          call(aten.gt.Tensor, cols, call(aten.sub.Tensor, query_row, window)))
        own_row = call(aten.eq.Tensor, cols, query_row)
        keep = call(aten.ne.Scalar, attention_mask, 0)  # [B, T]
        keep = call(aten.unsqueeze.default, call(aten.unsqueeze.default, keep, 1), 1)  # [B, 1, 1, T]
        mask = call(aten.logical_or.default, call(aten.logical_and.default, causal, keep), own_row)
    mask.meta[PADDING_CAUSAL_MASK] = (True, window)
    return mask
