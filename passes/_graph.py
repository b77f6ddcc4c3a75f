"""Graph helpers shared by the passes: layout chains, index probing, last-dim parts.

Matching by dataflow needs to see through pure data movement (view, transpose, split, expand, ...)
without caring which layout a model author chose. A *layout chain* is a run of such ops from a
source tensor to a use; *probing* runs that chain on a tensor that holds its own element indices,
so the result says, for every element of the use, which element of the source it is.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from mla_fx.weight_recipes import carry_recipe

aten = torch.ops.aten

LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int,
    aten.split_with_sizes.default, aten.split.Tensor, aten.alias.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.t.default, aten.contiguous.default, aten.detach.default,
}
SPLIT_OPS = {aten.split_with_sizes.default, aten.split.Tensor}
SDPA = aten.scaled_dot_product_attention.default
LINEAR = aten.linear.default


def is_layout(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        src = node.args[0]
        return isinstance(src, fx.Node) and src.target in SPLIT_OPS
    return node.target in LAYOUT_OPS


def layout_source(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back through layout ops; return (first non-layout node, chain in forward order)."""
    chain: list[fx.Node] = []
    while is_layout(node):
        chain.append(node)
        node = node.args[0]
    chain.reverse()
    return node, chain


def scalar_factor(node: fx.Node) -> float | None:
    """The constant of x * c or x / c (a Python number), else None."""
    if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], (int, float)):
        return None
    if node.target is aten.mul.Tensor or node.target is aten.mul.Scalar:
        return float(node.args[1])
    if node.target is aten.div.Tensor or node.target is aten.div.Scalar:
        return 1.0 / float(node.args[1])
    return None


def scaled_layout_source(node: fx.Node) -> tuple[fx.Node, list[fx.Node], float]:
    """Like layout_source, but also through multiplications by constants (LongCat-Flash scales q and
    the latent); returns (source, layout chain without the multiplications, product of the constants)."""
    chain: list[fx.Node] = []
    factor = 1.0
    while True:
        c = scalar_factor(node)
        if c is not None:
            factor *= c
        elif is_layout(node):
            chain.append(node)
        else:
            break
        node = node.args[0]
    chain.reverse()
    return node, chain, factor


def concrete(x):
    """Replace symbolic sizes (nodes or SymInts) by the example values they were traced with."""
    if isinstance(x, fx.Node):
        return concrete(x.meta["val"])
    if isinstance(x, torch.SymInt):
        return optimization_hint(x)
    if isinstance(x, (list, tuple)):
        return type(x)(concrete(v) for v in x)
    return x


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(concrete(d) for d in node.meta["val"].shape)


def run_chain(chain: Sequence[fx.Node], value: torch.Tensor) -> torch.Tensor:
    """Evaluate a layout chain (a path: each op reads the one before) on `value` in place of its source."""
    for node in chain:
        value = node.target(value, *concrete(tuple(node.args[1:])), **concrete(dict(node.kwargs)))
    return value


def probe_features(source: fx.Node, chain: Sequence[fx.Node]) -> torch.Tensor | None:
    """For a chain from a [..., N] source to a [B, H, S, D] use, return the map [H, D] -> feature n.

    The chain must be a pure per-token gather: element [b, h, s, d] of the use is feature map[h, d]
    of token (b, s) of the source, with the source's leading dims read as (B, S) in row-major order.
    Returns None when the chain does anything else (mixes tokens, reorders batch and sequence, ...).
    """
    src_shape = shape(source)
    n = src_shape[-1]
    tokens = 1
    for d in src_shape[:-1]:
        tokens *= d
    index = torch.arange(tokens * n, dtype=torch.float64).reshape(src_shape)
    out = run_chain(chain, index)
    if out.dim() != 4:
        return None
    b, h, s, d = out.shape
    if b * s != tokens:
        return None
    feature_map = out[0, :, 0, :].to(torch.long)
    token = torch.arange(b * s, dtype=torch.float64).reshape(b, 1, s, 1) * n
    if not torch.equal(out, token + feature_map.to(torch.float64).reshape(1, h, 1, d)):
        return None
    return feature_map


def probe_heads_to_features(chain: Sequence[fx.Node], out_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Forward probe: from an attention output [B, H, S, D] through `chain` to a [B, S, F] use.

    Returns map [H, D] -> feature f of the use, or None if the chain is not a per-token merge of heads.
    """
    b, h, s, d = out_shape
    index = torch.arange(b * h * s * d, dtype=torch.float64).reshape(b, h, s, d)
    out = run_chain(chain, index)
    if out.dim() != 3 or tuple(out.shape) != (b, s, h * d):
        return None
    code = out[0, 0].long()  # feature f of token (0, 0) holds the index of element (0, h, 0, dd)
    heads, dims = code // (s * d), code % (s * d)
    if torch.any(dims >= d):
        return None
    bi = torch.arange(b, dtype=torch.float64).reshape(b, 1, 1)
    si = torch.arange(s, dtype=torch.float64).reshape(1, s, 1)
    if not torch.equal(out, ((bi * h + heads) * s + si) * d + dims):
        return None
    feature_map = torch.full((h, d), -1, dtype=torch.long)
    feature_map[heads, dims] = torch.arange(h * d)
    return feature_map if bool((feature_map >= 0).all()) else None


def last_dim_parts(node: fx.Node) -> list[tuple[int, int, fx.Node]] | None:
    """Sources of a tensor along its last dim: [(start, end, source)], from cat or slice_scatter chains.

    HF models build the attention key with new_empty + copy_ into two slices (functionalized to
    slice_scatter); others use cat. Returns None if the node is neither, or the parts leave a gap.
    """
    ndim = node.meta["val"].dim()

    def is_last(dim) -> bool:
        return dim in (-1, ndim - 1)

    if node.target is aten.cat.default and is_last(node.args[1] if len(node.args) > 1 else 0):
        parts, start = [], 0
        for src in node.args[0]:
            width = concrete(src.meta["val"].shape[-1])
            parts.append((start, start + width, src))
            start += width
        return parts
    if node.target is aten.slice_scatter.default:
        written: dict[tuple[int, int], fx.Node] = {}
        width = concrete(node.meta["val"].shape[-1])
        while node.target is aten.slice_scatter.default:
            base, src, dim, start, end = (list(node.args) + [None, None, None])[:5]
            if not is_last(dim):
                return None
            start, end = start or 0, min(end if end is not None else width, width)
            if src.target is aten.copy.default:
                src = src.args[1]
            written.setdefault((start, end), src)
            node = base
        if node.target not in (aten.new_empty.default, aten.empty.memory_format, aten.zeros.default,
                               aten.new_zeros.default):
            return None
        parts = sorted((s, e, n) for (s, e), n in written.items())
        covered = 0
        for s, e, _ in parts:
            if s != covered:
                return None
            covered = e
        return parts if covered == width else None
    return None


def strip_expand(node: fx.Node) -> fx.Node:
    """k_rope is broadcast to all heads with expand; the ops broadcast by themselves."""
    while node.op == "call_function" and node.target in (aten.expand.default, aten.clone.default):
        node = node.args[0]
    return node


def get_param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    if node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def add_param(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register a constant weight on the module and return a get_attr node for it."""
    base, i = name, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    data = value.detach().contiguous()
    param = torch.nn.Parameter(data, requires_grad=False)
    carry_recipe(data, param)  # a weight computed from meta weights keeps how it was computed
    gm.register_parameter(name, param)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def users_of(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    return {u for n in nodes for u in n.users}
