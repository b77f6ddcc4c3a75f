"""Per-layer checks at any model size: each MLA layer's attention, original against rewritten, in float64, on
that layer's weights alone.

From the structure graph (before the passes) and the rewritten one, each site's attention block is cut out:
from the hidden state its projections read (the input of the linear that makes the latent) to the value it
hands back (the output projection's result, or what replaced it). Only the weights that block reads are
loaded, in float64; new weights are computed from their recipes in float64. Both blocks run on the same random
hidden state; the rewrite is exact, so the relative difference is rounding (~1e-15). The structure is captured in
the model's dtype, whose casts (RMSNorm's, rotary's) are constants of the graph: the blocks widen them to float64
(:func:`mla_fx.precision.graph_in_float64`), so nothing in a block rounds to a lower precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import fx

from mla_fx.check import TOLERANCES, Comparison, compare
from mla_fx.errors import MLAFXError
from mla_fx.passes._graph import LINEAR, SDPA
from mla_fx.passes.find_mla_sites import MLASite
from mla_fx.precision import graph_in_float64
from mla_fx.structure import run_on_cpu
from mla_fx.weight_recipes import Node, evaluate

ATTENTIONS = (SDPA, torch.ops.mla_fx.latent_attention.default, torch.ops.mla_fx.split_rope_attention.default)


def _block_input(latent: fx.Node) -> fx.Node:
    """The tensor the latent projection reads: walk back from c_KV to the first linear."""
    frontier, seen = [latent], set()
    while frontier:
        node = frontier.pop(0)
        if node.target is LINEAR:
            return node.args[0]
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    raise MLAFXError(f"per-layer check: no linear makes the latent {latent.name}")


def _block_output(attn: fx.Node) -> tuple[fx.Node, int]:
    """(the node that reads the output projection's result, which argument it is)."""
    node = attn
    while len(node.users) == 1 and node.target is not LINEAR:
        node = next(iter(node.users))
    if node.target is not LINEAR or len(node.users) != 1:
        raise MLAFXError(f"per-layer check: the output of {attn.name} does not reach one output projection")
    user = next(iter(node.users))
    return user, user.args.index(node)


def extract_block(gm: fx.GraphModule, start: str, consumer: str, arg: int) -> tuple[fx.Graph, list[str]]:
    """The subgraph computing `consumer.args[arg]` from the node named `start` (and the graph's inputs), as a
    graph `(hidden, *graph inputs) -> value`, and the weights it reads."""
    nodes = {n.name: n for n in gm.graph.nodes}
    start_node, out = nodes[start], nodes[consumer].args[arg]
    needed, stack = set(), [out]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is not start_node:
            stack.extend(node.all_input_nodes)
    if sum(n.target in ATTENTIONS for n in needed) != 1:
        raise MLAFXError(f"per-layer check: the block ending at {consumer} is not one attention")
    graph, env = fx.Graph(), {}
    env[start_node] = graph.placeholder("hidden")
    env[start_node].meta["val"] = start_node.meta["val"]  # its width sizes the test input
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in needed and n is not start_node]
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    weights = []
    for node in gm.graph.nodes:
        if node in needed and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op == "get_attr":
                weights.append(node.target)
    graph.output(env[out])
    run_on_cpu(graph)
    return graph, weights


def layer_blocks(original: fx.GraphModule, rewritten: fx.GraphModule, site: MLASite,
                 fetch64: Callable[[str], torch.Tensor], recipes: dict[str, Node]
                 ) -> Iterator[fx.GraphModule]:
    """The site's attention block cut out of the original graph, then of the rewritten one (made one at a time, so
    one block's weights are held), float64 throughout, with its weights in float64: `block(hidden, *graph
    inputs)`."""
    nodes = {n.name: n for n in original.graph.nodes}
    start = _block_input(nodes[site.labels["latent"]])
    consumer, arg = _block_output(nodes[site.attention])
    for gm in (original, rewritten):
        yield _float64_block(gm, start.name, consumer.name, arg, fetch64, recipes)  # this frame keeps no part of it


def _float64_block(gm: fx.GraphModule, start: str, consumer: str, arg: int,
                   fetch64: Callable[[str], torch.Tensor], recipes: dict[str, Node]) -> fx.GraphModule:
    graph, weights = extract_block(gm, start, consumer, arg)
    graph_in_float64(graph)  # the structure is captured in the model's dtype, with its casts
    return fx.GraphModule({w: evaluate(recipes[w], fetch64, float64=True) if w in recipes else fetch64(w)
                           for w in weights}, graph)


def _drop_weights(block: fx.GraphModule) -> None:
    """Free a block's float64 weights now (1.5 GB for a DeepSeek-V3 layer): a GraphModule and its Graph refer to
    each other, so the block itself goes only when the cyclic collector runs (a full collection takes about 0.4 s),
    which may be after the next block is built."""
    for module in block.modules():
        module._parameters.clear()
        module._buffers.clear()
        for name in [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]:
            delattr(module, name)


def check_layers(original: fx.GraphModule, rewritten: fx.GraphModule, sites: list[MLASite],
                 fetch64: Callable[[str], torch.Tensor], recipes: dict[str, Node], example: torch.Tensor,
                 progress: Callable[[range], object] | None = None) -> list[Comparison]:
    """One float64 comparison per site. `fetch64(name)`: an original weight or buffer in float64; `recipes`:
    the new weights' recipes; `example`: input ids (the blocks read only their shape)."""
    out = []
    layers = range(len(sites)) if progress is None else progress(range(len(sites)))
    for i in layers:
        site = sites[i]
        results = []
        for block in layer_blocks(original, rewritten, site, fetch64, recipes):
            if not results:
                width = int(next(iter(block.graph.nodes)).meta["val"].shape[-1])
                hidden = torch.randn(*example.shape, width, generator=torch.Generator().manual_seed(i),
                                     dtype=torch.float64)
            n_inputs = sum(1 for n in block.graph.nodes if n.op == "placeholder") - 1
            with torch.no_grad():
                results.append(block(hidden, *([example] * n_inputs)))
            _drop_weights(block)
            del block
        out.append(compare(f"attention[layer {i} {site.module or site.attention} float64]", results[0], results[1],
                           TOLERANCES[torch.float64]))
    return out
