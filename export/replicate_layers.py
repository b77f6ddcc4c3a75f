"""Copy the lowered template layers of an ONNX graph into every layer of their kind (:mod:`.layer_units`).

The graph holds one layer of each kind, each entered through a `LayerInput` marker. A node belongs to the layer
of the highest marker or layer-owned input (weight, past_latent) it depends on; a template's nodes are copied
for each layer of its kind, in order, with that layer's weights and cache, reading the previous layer's output;
then the markers go. The copies are checked as the FX units were: a template that reads or feeds anything but
its own inputs, values all layers share and the next marker is refused (the caller then lowers every layer).
"""

from __future__ import annotations

import onnx_ir as ir

from .layer_units import MARKER_DOMAIN, MARKER_OP, LayerPlan, NotRepeatable

_SHARED = -1
_SIZES = ("Shape", "Size")


def _is_size(node: ir.Node) -> bool:
    return node.domain == "" and node.op_type in _SIZES


def _markers(graph: ir.Graph) -> dict[int, ir.Node]:
    return {node.attributes["layer"].as_int(): node for node in graph
            if node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP}


def _layers(graph: ir.Graph, plan: LayerPlan, markers: dict[int, ir.Node]) -> dict[ir.Node, int]:
    at = {}
    value_layer = {v: plan.owner.get(v.name, _SHARED) for v in graph.inputs}
    for node in graph:
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise NotRepeatable(f"{node.name} ({node.op_type}) has a subgraph")
        if node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP:
            layer = node.attributes["layer"].as_int()
        elif _is_size(node):
            layer = _SHARED  # layers alike have tensors of the same shapes
        else:
            layer = max((value_layer.get(v, _SHARED) for v in node.inputs if v is not None), default=_SHARED)
        at[node] = layer
        for out in node.outputs:
            value_layer[out] = layer
    return at


def _template_nodes(graph: ir.Graph, plan: LayerPlan, at: dict[ir.Node, int], markers: dict[int, ir.Node],
                    t: int, nxt: int) -> list[ir.Node]:
    entry = markers[t].outputs[0] if t in markers else None
    nodes = [n for n in graph if at[n] == t and n is not markers.get(t)]
    inside = set(nodes)
    own = {v for n in nodes for v in n.outputs}
    inputs = {v for v in graph.inputs if plan.owner.get(v.name) == t}
    outputs = {v for v in graph.outputs if plan.owner.get(v.name) == t}
    produced_by = {v: n for n in graph for v in n.outputs}
    for node in nodes:
        for v in node.inputs:
            if v is None or v in own or v in inputs or v is entry:
                continue
            producer = produced_by.get(v)
            if producer is not None and at[producer] != _SHARED:
                raise NotRepeatable(f"layer {t}'s {node.name} reads {v.name} of layer {at[producer]}")
        for out in node.outputs:
            for user, _ in out.uses():
                if user not in inside and user is not markers[nxt] and not _is_size(user):
                    raise NotRepeatable(f"layer {t}'s {out.name} is read by {user.name} outside the layer")
            if out.is_graph_output() and out not in outputs:
                raise NotRepeatable(f"layer {t}'s {out.name} is an output of another layer")
    if markers[nxt].inputs[0] not in own:
        raise NotRepeatable(f"the value entering layer {nxt} is not computed by layer {t}")
    return nodes


def _copy_attr(attr: ir.Attr) -> ir.Attr:
    return ir.Attr(attr.name, attr.type, attr.value, doc_string=attr.doc_string)


def replicate_layers(model: ir.Model, plan: LayerPlan) -> None:
    """Give `model` (lowered with only `plan.templates`' layers) every layer, in order; remove the markers."""
    graph = model.graph
    markers = _markers(graph)
    kept = plan.templates
    if set(markers) - {0} != set(kept[1:]) | {plan.layers} or kept[0] != 0:
        raise NotRepeatable(f"the lowered graph's layer markers {sorted(markers)} do not match layers {kept}")
    at = _layers(graph, plan, markers)
    after = {t: ([i for i in kept if i > t] + [plan.layers])[0] for t in kept}
    nodes = {t: _template_nodes(graph, plan, at, markers, t, after[t]) for t in kept}
    exits = {t: markers[after[t]].inputs[0] for t in kept}  # before any marker is rewired
    copies = {c.layer: c for c in plan.copies}
    by_name = {v.name: v for v in graph.inputs}
    previous = exits[0]
    for layer in range(1, plan.layers):
        if layer not in copies:
            markers[layer].replace_input_with(0, previous)
            previous = exits[layer]
            continue
        copy = copies[layer]
        t = copy.template
        mapping: dict[ir.Value, ir.Value] = {markers[t].outputs[0]: previous}
        for old, new in copy.names.items():
            if old in by_name:
                source = by_name[old]
                value = ir.Value(name=new, shape=source.shape, type=source.type)
                graph.inputs.append(value)
                mapping[source] = value
        for node in nodes[t]:
            clone = ir.Node(node.domain, node.op_type, [mapping.get(v, v) if v is not None else None
                                                        for v in node.inputs],
                            attributes=[_copy_attr(a) for a in node.attributes.values()],
                            num_outputs=len(node.outputs), version=node.version, name=f"{node.name}.layer{layer}")
            for out, new in zip(node.outputs, clone.outputs, strict=True):
                new.name = copy.names.get(out.name, f"{out.name}.layer{layer}") if out.is_graph_output() \
                    else f"{out.name}.layer{layer}"
                new.shape, new.type = out.shape, out.type
                mapping[out] = new
                if out.is_graph_output():
                    graph.outputs.append(new)
            graph.append(clone)
        previous = mapping[exits[t]]
    markers[plan.layers].replace_input_with(0, previous)
    for marker in markers.values():
        ir.convenience.replace_all_uses_with(marker.outputs[0], marker.inputs[0])
        graph.remove(marker, safe=True)
    graph.sort()
