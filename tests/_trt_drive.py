"""Drive TensorRT's own plugin library (over tests/_trt_standin.py) the way TensorRT's ONNX parser and
builder do, from the mla_fx::LatentAttention nodes of an exported step.onnx; print what TensorRT would
have received, as JSON, for tests/test_tensorrt_library.py to check.

    python tests/_trt_drive.py [--ptx-version=80] STEP.onnx BATCH,CACHE [BATCH,CACHE ...]

Run in a process of its own: it installs the stand-in as `tensorrt` and registers the plugin, and the
kernel is compiled by Triton's real compiler (no TRITON_INTERPRET). Per node and float type: the
plugin created from the node's attributes as the parser converts them (FLOAT -> float32, INT -> int32,
STRING -> char, in the creator's field order, preferring the AOT implementation), the output types and
shape expressions, the type/format combinations the autotune offers, and `get_launch_params` and
`get_kernel`'s results, with every launch expression evaluated at the given (batch, cache) shapes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
import _trt_standin as standin  # noqa: E402

trt = standin.install()
import tensorrt.plugin  # noqa: E402, F401  (TensorRT's library, which imports the stand-in)

from mla_fx.export import tensorrt_plugin as plugin  # noqa: E402

FLOAT_TYPES = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
ONNX_FIELDS = {onnx.AttributeProto.FLOAT: (np.float32, trt.PluginFieldType.FLOAT32),
               onnx.AttributeProto.INT: (np.int32, trt.PluginFieldType.INT32)}


def parser_fields(node: onnx.NodeProto, creator) -> list:
    """onnx-tensorrt's loadFields: for each field the creator declares, in its order, the node's attribute."""
    attrs = {a.name: a for a in node.attribute}
    fields = []
    for declared in creator.field_names:
        attr = attrs.get(declared.name)
        if attr is None:
            continue
        if attr.type == onnx.AttributeProto.STRING:
            fields.append(trt.PluginField(declared.name, attr.s, trt.PluginFieldType.CHAR))
        else:
            np_type, field_type = ONNX_FIELDS[attr.type]
            value = onnx.helper.get_attribute_value(attr)
            fields.append(trt.PluginField(declared.name, np.array([value], dtype=np_type), field_type))
    return trt.PluginFieldCollection(fields)


def create(node: onnx.NodeProto, request):
    """The parser's plugin import: a node with plugin_namespace goes to the registered creator of its op type."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    namespace = attrs["plugin_namespace"].decode()
    creator = trt.get_plugin_registry().get_creator(node.op_type, "1", namespace)
    if creator is None:
        raise SystemExit(f"no plugin creator {namespace}::{node.op_type} version 1 is registered")
    fc = parser_fields(node, creator)
    return creator.create_plugin(node.op_type, namespace, fc, trt.TensorRTPhase.BUILD, request), fc


def build(plg, float_type, heads: int, d_c: int, d_r: int, shapes: list[tuple[int, int]]) -> dict:
    """What the builder asks of the plugin for one float type, and the launch evaluated at `shapes`."""
    builder = trt.IExprBuilder()
    c = builder.constant
    batch, cache = standin.symbol("batch"), standin.symbol("cache")
    dims = [[batch, c(heads), c(1), c(d_c)], [batch, c(heads), c(1), c(d_r)], [batch, cache, c(d_c + d_r)],
            [batch, c(1), c(1), cache]]
    types = [float_type] * 3 + [trt.DataType.BOOL]
    out_types = plg.get_output_data_types(types, [len(d) for d in dims])
    out_exprs = plg.get_output_shapes([trt.DimsExprs(d) for d in dims], [], builder)

    def descs(io_types):
        concrete = [[-1, heads, 1, d_c], [-1, heads, 1, d_r], [-1, -1, d_c + d_r], [-1, 1, 1, -1],
                    [-1, heads, 1, d_c]]
        return [trt.DynamicPluginTensorDesc(trt.PluginTensorDesc(shape, t)) for shape, t in
                zip(concrete, io_types, strict=True)]

    offered = plg.get_supported_format_combinations(descs(types + [float_type]), 4)
    combos = [[(d.type.name, d.format.name) for d in offered[i:i + 5]] for i in range(0, len(offered), 5)]
    chosen = descs(types + [float_type])
    plg.configure_plugin(chosen[:4], chosen[4:])
    tactics = plg.get_valid_tactics()
    plg.set_tactic(0)  # TensorRT's default tactic where a plugin advertises none

    class Launch:  # the C++ KernelLaunchParams TensorRT hands in
        pass

    class Setter(dict):  # the symbolic-expression setter for the extra kernel arguments
        nbSymExprs = 0

    launch, setter = Launch(), Setter()
    plg.get_launch_params([trt.DimsExprs(d) for d in dims], chosen, 4, launch, setter, builder)
    name, ptx = plg.get_kernel([d.desc for d in chosen[:4]], [d.desc for d in chosen[4:]])
    fields = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    at = []
    for b, t in shapes:
        env = {"batch": b, "cache": t}
        at.append({"batch": b, "cache": t,
                   "output_shape": [e.evaluate(env) for e in out_exprs[0]],
                   "launch": {f: getattr(launch, f).expr.evaluate(env) for f in fields},
                   "extra_args": [setter[i].expr.evaluate(env) for i in range(setter.nbSymExprs)]})
    kernel = plugin.compile_kernel(plugin.KERNEL_DTYPES[float_type.name], d_c, d_r, float(plg.attrs["scale"]),
                                   plugin.device_arch(), plugin.kernel_options["ptx_version"])  # the cached one
    return {"type": float_type.name, "kernel": {"block_h": kernel.block_h, "num_warps": kernel.num_warps,
                                                 "shared_bytes": kernel.shared_bytes},
            "output_types": [t.name for t in out_types], "combinations": combos,
            "tactics": list(tactics), "kernel_name": name if isinstance(name, str) else name.decode(),
            "ptx": ptx.decode() if isinstance(ptx, bytes) else ptx,
            "launch_types": sorted({type(getattr(launch, f)).__name__ for f in fields}),
            "extra_arg_types": [setter[i].dtype.name for i in range(setter.nbSymExprs)],
            "extra_arg_count": setter.nbSymExprs, "at": at}


def main() -> None:
    args = sys.argv[1:]
    if args[0].startswith("--ptx-version="):
        plugin.kernel_options["ptx_version"] = int(args.pop(0).split("=")[1])
    model = onnx.shape_inference.infer_shapes(onnx.load(args[0]))
    shapes = [tuple(int(v) for v in arg.split(",")) for arg in args[1:]]
    plugin.register_plugin()
    nodes = [n for n in model.graph.node if n.op_type == "LatentAttention"]
    heads = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.input)}
    result = {"tensorrt": trt.__version__, "functions": [f.name for f in model.functions], "nodes": []}
    for node in nodes:
        aot, fc = create(node, trt.QuickPluginCreationRequest.PREFER_AOT)
        jit, _ = create(node, trt.QuickPluginCreationRequest.PREFER_JIT)
        attrs = {f.name: (f.data.tobytes().decode() if f.type == trt.PluginFieldType.CHAR else f.data.item())
                 for f in fc}
        d_c, d_r = int(attrs["kv_lora_rank"]), int(attrs["rope_dim"])
        q_shape = heads[node.input[0]].type.tensor_type.shape.dim
        n_heads = q_shape[1].dim_value
        entry = {"name": node.name, "fields": list(attrs), "field_values": attrs,
                 "aot_class": type(aot).__name__, "jit_class": type(jit).__name__,
                 "jit_serialized": [f.name for f in jit.get_fields_to_serialize()],
                 "heads": n_heads, "builds": [build(aot, t, n_heads, d_c, d_r, shapes) for t in FLOAT_TYPES]}
        result["nodes"].append(entry)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
