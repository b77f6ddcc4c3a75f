"""The decoder layers of an inference program as units, so that the exporter lowers one layer of each kind.

torch.onnx spends seconds per decoder layer (its own torch.export, decompositions, symbolic shapes), and a
real model repeats two or three kinds of layer dozens of times. Here the program's FX graph is cut at the
hidden state entering each layer (read off the HF modules' `nn_module_stack`): a marker node
(`mla_fx_export::LayerInput`, an identity) is put there, and a node belongs to layer i when the highest marker
or layer-owned input (weight, past_latent) it depends on is layer i's. Each unit is checked to be closed (it
reads only its marker, its own weights and cache, and values every layer shares, and feeds only the next marker
and its own outputs), and units with the same operations, literals and weight shapes are one kind.
:func:`plan_layers` then removes every layer but the first of each kind; :mod:`.replicate_layers` copies
the lowered templates back into the ONNX graph under each layer's names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

MARKER_DOMAIN, MARKER_OP = "mla_fx_export", "LayerInput"
_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)$")
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SHARED = -1


class NotRepeatable(Exception):
    """The layers cannot be lowered once per kind (the message says why): lower the program whole."""


@dataclass(frozen=True)
class LayerCopy:
    """Layer `layer` made by copying `template`'s lowered nodes; `names` maps the template's ONNX input and
    output names (weights, past_latent.k, present_latent.k) to this layer's."""

    layer: int
    template: int
    names: dict[str, str]


@dataclass(frozen=True)
class LayerPlan:
    """What the ONNX side needs: the layer that owns each layer-owned input or output name, and the copies."""

    layers: int
    owner: dict[str, int]
    copies: list[LayerCopy]
    inputs: list[str]  # the marked program's inputs and outputs (the copied layers' caches removed)
    outputs: list[str]

    @property
    def templates(self) -> list[int]:
        copied = {c.layer for c in self.copies}
        return [i for i in range(self.layers) if i not in copied]


def _stack_layer(node: fx.Node) -> int | None:
    """The decoder layer whose module made `node`; _SHARED for the model's other modules; None for nodes
    without a module stack (inputs, weights, nodes the passes made)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        match = _LAYER_PATH.search(path)
        if match:
            return int(match.group(1))
    return _SHARED


def _fake(node: fx.Node):
    return node.meta.get("val")


def _is_size(node: fx.Node) -> bool:
    """A symbolic size (batch * tokens, ...): torch.export computes each once, wherever it first appears, and
    every layer reads it; it depends on shapes only, which are alike in layers alike, so it counts as shared."""
    return isinstance(_fake(node), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _boundaries(gm: fx.GraphModule) -> list[fx.Node | None] | None:
    """The value entering each decoder layer, and (last) the one leaving the final layer; None where the module
    stack does not tell. Layer 0's input is recognised by the shape and dtype of layer 1's."""
    stack = {n: None if _is_size(n) else _stack_layer(n) for n in gm.graph.nodes}
    layers = {i for i in stack.values() if i is not None and i != _SHARED}
    if not layers or layers != set(range(max(layers) + 1)):
        return None
    n_layers = max(layers) + 1
    crossing: dict[int, set[fx.Node]] = {i: set() for i in range(n_layers + 1)}
    outside: set[fx.Node] = set()
    for node, i in stack.items():
        for arg in node.all_input_nodes:
            j = stack[arg]
            if i is None or j is None:
                continue
            if j >= 0 and i == j + 1 or j == n_layers - 1 and i == _SHARED:
                crossing[n_layers if i == _SHARED else i].add(arg)
            elif i == 0 and j == _SHARED:
                outside.add(arg)
    if any(len(crossing[i]) != 1 for i in range(1, n_layers + 1)):
        return None
    found: list[fx.Node | None] = [None] + [next(iter(crossing[i])) for i in range(1, n_layers + 1)]
    if n_layers > 1:
        like = _fake(found[1])
        alike = [n for n in outside if isinstance(_fake(n), torch.Tensor) and isinstance(like, torch.Tensor)
                 and _fake(n).dtype == like.dtype and str(_fake(n).shape) == str(like.shape)]
        found[0] = alike[0] if len(alike) == 1 else None
    return found


def _insert_marker(gm: fx.GraphModule, value: fx.Node, index: int) -> fx.Node:
    g = gm.graph
    users = list(value.users)
    with g.inserting_before(value.next):
        shape = [g.call_function(torch.ops.aten.sym_size.int, (value, d)) for d in range(_fake(value).dim())]
        marker = g.call_function(torch.onnx.ops.symbolic, (f"{MARKER_DOMAIN}::{MARKER_OP}", (value,),
                                 {"layer": index}), {"dtype": _fake(value).dtype, "shape": shape, "version": 1})
    marker.meta["val"] = _fake(value)
    for user in users:
        user.replace_input_with(value, marker)
    return marker


def _set_marker_input(gm: fx.GraphModule, marker: fx.Node, value: fx.Node) -> None:
    g = gm.graph
    with g.inserting_before(marker):
        shape = [g.call_function(torch.ops.aten.sym_size.int, (value, d)) for d in range(_fake(value).dim())]
    name, _, attrs = marker.args
    marker.args = (name, (value,), attrs)
    marker.kwargs = {**marker.kwargs, "shape": shape}


@dataclass
class _Units:
    markers: dict[int, fx.Node]  # layer -> marker (the tail's is at index `layers`)
    nodes: list[list[fx.Node]]
    leaves: list[list[fx.Node]]  # in first-use order
    templates: list[int]  # per layer, the first layer of its kind


def _leaf_layer(leaf: fx.Node, dep: dict[fx.Node, int], markers: set[fx.Node], n_layers: int) -> int:
    """A weight or input named for a layer is that layer's; one without a layer in its name (a weight the
    passes made, a past_latent input) is the layer's whose nodes alone read it, directly or through shared
    nodes; one that reaches layers only through their input (the embedding) or reaches several is shared."""
    if leaf.op == "get_attr":
        match = _LAYER_NAME.search(str(leaf.target))
        if match:
            return int(match.group(1))
    reached, todo, seen = set(), list(leaf.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user in markers:
            reached.add(None)
        elif dep.get(user, _SHARED) >= 0:
            reached.add(dep[user])
        else:
            todo.extend(user.users)
    (layer,) = reached if len(reached) == 1 else (None,)
    return layer if layer is not None and 0 <= layer < n_layers else _SHARED


def _dependencies(gm: fx.GraphModule, markers: dict[int, fx.Node], n_layers: int) -> dict[fx.Node, int]:
    """Each node's layer: the highest marker (or layer-owned leaf) among its inputs, -1 where none."""
    at_marker = {m: i for i, m in markers.items()}

    def propagate(leaf_layers: dict[fx.Node, int]) -> dict[fx.Node, int]:
        dep = {}
        for node in gm.graph.nodes:
            if node in at_marker:
                dep[node] = at_marker[node]
            elif _is_size(node):
                dep[node] = _SHARED
            elif node.op in ("placeholder", "get_attr"):
                dep[node] = leaf_layers.get(node, _SHARED)
            else:
                dep[node] = max((dep[a] for a in node.all_input_nodes), default=_SHARED)
        return dep

    by_markers = propagate({})
    leaves = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    return propagate({leaf: _leaf_layer(leaf, by_markers, set(at_marker), n_layers) for leaf in leaves})


def _literal(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_literal(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in sorted(value.items())) + "}"
    return repr(value)


def _signature(gm: fx.GraphModule, unit: list[fx.Node], leaves: list[fx.Node], marker: fx.Node | None) -> tuple:
    local = {n: i for i, n in enumerate(unit)}
    leaf_index = {n: i for i, n in enumerate(leaves)}

    def norm(value):
        if isinstance(value, fx.Node):
            if value in local:
                return ("n", local[value])
            if value is marker:
                return ("h",)
            if value in leaf_index:
                return ("w", leaf_index[value])
            return ("size", str(_fake(value))) if _is_size(value) else ("s", value.name)
        if isinstance(value, (list, tuple)):
            return tuple(norm(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, norm(v)) for k, v in sorted(value.items()))
        return _literal(value)

    def leaf(node: fx.Node):
        if node.op == "get_attr":  # a weight the passes made has no layer in its name: its place tells
            owner, _, name = str(node.target).rpartition(".")
            tensor = getattr(gm.get_submodule(owner), name)
            role = _LAYER_NAME.sub(".layers.*.", str(node.target)) if _LAYER_NAME.search(str(node.target)) else None
            return ("attr", role, tuple(tensor.shape), str(tensor.dtype))
        return ("input", str(getattr(_fake(node), "shape", None)), str(getattr(_fake(node), "dtype", None)))

    return (tuple(leaf(n) for n in leaves),
            tuple((n.op, str(n.target), norm(n.args), norm(n.kwargs)) for n in unit))


def _pull_in(gm: fx.GraphModule, dep: dict[fx.Node, int], markers: set[fx.Node], n_layers: int) -> None:
    """A shared node that one layer alone reads (that layer's `cos.unsqueeze(1)`) is that layer's."""
    for node in reversed(gm.graph.nodes):
        if dep[node] != _SHARED or node.op != "call_function" or _is_size(node) or not node.users:
            continue
        layers = {dep[u] for u in node.users}
        if len(layers) == 1 and 0 <= next(iter(layers)) < n_layers and not markers & set(node.users):
            dep[node] = next(iter(layers))


def _units(gm: fx.GraphModule, markers: dict[int, fx.Node], n_layers: int) -> _Units | str:
    """Each layer's nodes and leaves, checked closed, and the first layer of its kind; a string says why not."""
    dep = _dependencies(gm, markers, n_layers)
    marker_set = set(markers.values())
    _pull_in(gm, dep, marker_set, n_layers)
    nodes: list[list[fx.Node]] = [[] for _ in range(n_layers)]
    leaves: list[list[fx.Node]] = [[] for _ in range(n_layers)]
    for node in gm.graph.nodes:
        i = dep[node]
        if node in marker_set or not 0 <= i < n_layers:
            continue
        if node.op in ("placeholder", "get_attr"):
            continue
        nodes[i].append(node)
        for arg in node.all_input_nodes:
            if arg.op in ("placeholder", "get_attr") and dep[arg] == i and arg not in leaves[i]:
                leaves[i].append(arg)
    for i in range(n_layers):  # closed: reads its marker, its leaves, shared values; feeds the next marker
        own = set(nodes[i])
        for node in nodes[i]:
            for arg in node.all_input_nodes:
                if not (arg in own or arg is markers.get(i) or dep[arg] == _SHARED or arg in leaves[i]):
                    return f"layer {i}'s {node.name} reads {arg.name} of layer {dep[arg]}"
            for user in node.users:
                if not (user in own or user is markers.get(i + 1) or user.op == "output" or _is_size(user)):
                    return f"layer {i}'s {node.name} feeds {user.name} outside the layer"
        nxt = markers[i + 1].args[1][0]
        if nxt not in own:
            return f"the value entering layer {i + 1} is not computed by layer {i}"
    signatures = [_signature(gm, nodes[i], leaves[i], markers.get(i)) for i in range(n_layers)]
    templates = []
    for i, sig in enumerate(signatures):
        same = [t for t in range(i) if 0 not in (t, i) or 0 in markers]  # without its marker, layer 0 is alone
        templates.append(next((t for t in same if templates[t] == t and signatures[t] == sig), i))
    return _Units(markers, nodes, leaves, templates)


def _leaf_name(leaf: fx.Node, inputs: dict[fx.Node, str]) -> str:
    return inputs[leaf] if leaf.op == "placeholder" else str(leaf.target)


def plan_layers(gm: fx.GraphModule, input_names: Sequence[str], output_names: Sequence[str]) -> LayerPlan | None:
    """Mark the layers of `gm` and keep one of each kind (in place), and say how to copy them back; None where no
    two layers are alike (`gm` unchanged). Raises NotRepeatable where layers alike cannot be told apart."""
    found = _boundaries(gm)
    if found is None:
        raise NotRepeatable("the decoder layers are not delimited by their module stack")
    n_layers = len(found) - 1
    markers = {i: _insert_marker(gm, value, i) for i, value in enumerate(found) if value is not None}
    units = _units(gm, markers, n_layers)
    if isinstance(units, str):
        raise NotRepeatable(units)
    if all(t == i for i, t in enumerate(units.templates)):
        _remove_markers(gm)
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, input_names, strict=True))
    outputs = _output_names(gm, output_names)
    layer_outputs = [[name for node, name in outputs.items() if node in set(nodes)] for nodes in units.nodes]
    owner = {}
    for i in range(n_layers):
        owner.update({_leaf_name(leaf, inputs): i for leaf in units.leaves[i]})
        owner.update(dict.fromkeys(layer_outputs[i], i))
    copies = []
    for i, t in enumerate(units.templates):
        if t == i:
            continue
        names = {_leaf_name(a, inputs): _leaf_name(b, inputs)
                 for a, b in zip(units.leaves[t], units.leaves[i], strict=True)}
        names.update(zip(layer_outputs[t], layer_outputs[i], strict=True))
        copies.append(LayerCopy(i, t, names))
    problem = _keep_templates(gm, units, {c.layer for c in copies})
    if problem:
        raise NotRepeatable(problem)
    kept = [inputs[n] for n in gm.graph.nodes if n.op == "placeholder"]
    return LayerPlan(n_layers, owner, copies, kept, [outputs[n] for n in _outputs(gm)])


def _outputs(gm: fx.GraphModule) -> list[fx.Node]:
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]


def _output_names(gm: fx.GraphModule, names: Sequence[str]) -> dict[fx.Node, str]:
    return dict(zip(_outputs(gm), names, strict=True))


def _keep_templates(gm: fx.GraphModule, units: _Units, copied: set[int]) -> str | None:
    """Remove the copied layers: the value entering each flows on to the next layer's marker; their cache
    inputs and outputs go. A string says why they cannot be removed."""
    g = gm.graph
    for i in sorted(copied):
        _set_marker_input(gm, units.markers[i + 1], units.markers[i].args[1][0])
    (out,) = [n for n in g.nodes if n.op == "output"]
    dropped = {n for i in copied for n in units.nodes[i]}
    results = out.args[0]
    out.args = (type(results)(r for r in results if r not in dropped),)
    g.eliminate_dead_code()
    for node in reversed([n for i in sorted(copied) for n in units.nodes[i] if not n._erased]):
        if node.users:
            return f"{node.name} of a layer copied from another is read by {next(iter(node.users)).name}"
        g.erase_node(node)  # side-effect nodes (runtime asserts) that dead-code elimination keeps
    for i in copied:
        for leaf in units.leaves[i]:
            if leaf.op == "get_attr":
                owner, _, name = leaf.target.rpartition(".")
                module = gm.get_submodule(owner)
                module._parameters.pop(name, None)
                module._buffers.pop(name, None)
            if leaf.users:
                return f"{leaf.name} of a layer copied from another is read by {next(iter(leaf.users)).name}"
            if not leaf._erased:
                g.erase_node(leaf)
    gm.recompile()
    return None


def _remove_markers(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.target is torch.onnx.ops.symbolic and node.args[0] == f"{MARKER_DOMAIN}::{MARKER_OP}":
            node.replace_all_uses_with(node.args[1][0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
