"""The ONNX form of mla_fx::latent_attention (and of mla_fx::sparse_latent_attention): custom-domain nodes with
function bodies.

The node `mla_fx::LatentAttention(q_latent, q_rope, latent_kv, attn_mask)` carries the attributes in
ATTRIBUTES (names, order and types are the TensorRT plugin's registration in export/tensorrt_plugin.py).
The model also carries an ONNX *function* of that domain and name whose body is standard ops
(Concat, Unsqueeze, Slice, Attention-23), so ONNX Runtime runs the node, and TensorRT can replace it
with the registered plugin.

`mla_fx::SparseLatentAttention(q_latent, q_rope, latent_kv, indices, valid)` is DeepSeek Sparse Attention's
form: the rows a top-k selected per query token (GatherND, then Attention-23); its function body is all there is
(no TensorRT plugin).
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import opset23 as op

DOMAIN = "mla_fx"
OP_TYPE = "LatentAttention"
PLUGIN_NAMESPACE = "mla_fx"
OPSET_VERSION = 1
# (name, ONNX attribute type): the order is the plugin's parameter order after its input tensors
ATTRIBUTES = (("scale", onnx.AttributeProto.FLOAT), ("kv_lora_rank", onnx.AttributeProto.INT),
              ("rope_dim", onnx.AttributeProto.INT), ("plugin_namespace", onnx.AttributeProto.STRING))

_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


@onnxscript.script(opset=_opset, default_opset=op)
def LatentAttention(q_latent, q_rope, latent_kv, attn_mask, scale: float, kv_lora_rank: int, rope_dim: int,
                    plugin_namespace: str):
    """MQA over the latent row, with the heads folded into query rows so the one KV head is never
    repeated per head: Q = [q_latent ; q_rope] as [B, 1, H*S, d_c+d_r], K = row [B, 1, T, d_c+d_r],
    V = K[..., :d_c], mask repeated per head to [B, 1, H*S, T]."""
    q = op.Concat(q_latent, q_rope, axis=-1)
    q_rows = op.Reshape(q, [0, 1, -1, 0])
    heads = op.Slice(op.Shape(q_latent), [1], [2])
    repeat = op.Concat([1], heads, [1, 1], axis=0)
    mask_rows = op.Reshape(op.Tile(attn_mask, repeat), [0, 1, -1, 0])
    k = op.Unsqueeze(latent_kv, [1])
    d_c = op.Reshape(op.Constant(value_int=kv_lora_rank), [1])
    v = op.Slice(k, [0], d_c, [-1])
    out_rows = op.Attention(q_rows, k, v, mask_rows, scale=scale)
    return op.Reshape(out_rows, op.Shape(q_latent))


SPARSE_OP_TYPE = "SparseLatentAttention"


@onnxscript.script(opset=_opset, default_opset=op)
def SparseLatentAttention(q_latent, q_rope, latent_kv, indices, valid, scale: float, kv_lora_rank: int,
                          rope_dim: int):
    """MQA over the latent rows a top-k selected (DSA): each query token gathers its K rows once for all heads,
    rows [B, S, K, D] = GatherND(latent_kv [B, T, D], indices [B, S, K, 1], batch_dims=1). The query tokens are
    Attention's heads and the model's heads its query rows: Q [B, S, H, D], K = rows, V = rows[..., :d_c], mask
    valid [B, S, H, K] (ONNX Runtime does not broadcast the mask over query rows)."""
    q = op.Transpose(op.Concat(q_latent, q_rope, axis=-1), perm=[0, 2, 1, 3])
    rows = op.GatherND(latent_kv, op.Unsqueeze(indices, [-1]), batch_dims=1)
    d_c = op.Reshape(op.Constant(value_int=kv_lora_rank), [1])
    v = op.Slice(rows, [0], d_c, [-1])
    valid_shape = op.Shape(valid)
    mask_shape = op.Concat(op.Slice(valid_shape, [0], [2]), op.Slice(op.Shape(q_latent), [1], [2]),
                           op.Slice(valid_shape, [2], [3]), axis=0)
    out = op.Attention(q, rows, v, op.Expand(op.Unsqueeze(valid, [2]), mask_shape), scale=scale)
    return op.Transpose(out, perm=[0, 2, 1, 3])


def function_proto() -> onnx.FunctionProto:
    return LatentAttention.to_function_proto()


def sparse_function_proto() -> onnx.FunctionProto:
    return SparseLatentAttention.to_function_proto()


def attributes(scale: float, kv_lora_rank: int, rope_dim: int, sparse: bool = False
               ) -> dict[str, float | int | str]:
    """Attribute values in registration order (the sparse node's: without the plugin's namespace)."""
    if sparse:
        return {"scale": float(scale), "kv_lora_rank": int(kv_lora_rank), "rope_dim": int(rope_dim)}
    values = {"scale": float(scale), "kv_lora_rank": int(kv_lora_rank), "rope_dim": int(rope_dim),
              "plugin_namespace": PLUGIN_NAMESPACE}
    assert list(values) == [name for name, _ in ATTRIBUTES]
    return values
