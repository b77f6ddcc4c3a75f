"""ONNX models saved with one shared copy of their weights.

step.onnx (absorbed) and prefill.onnx (un-absorbed) read mostly the same weights: embeddings, norms, query and
latent projections, experts, lm_head. Each initializer larger than INLINE_BYTES goes into WEIGHTS, an ONNX
external-data file beside the models (protobuf caps a model at 2 GiB; weights stay outside it at any size), once
per distinct content: the exporter's optimizer renames what it folds (a linear's transposed weight becomes
`val_42` in one model and `val_57` in the other), so tensors are matched by their bytes (a BLAKE2b digest), not
their names. Only the weights that differ (W_UK/W_UV in step, kv_b_proj in prefill) are stored for one model
alone. Offsets are aligned to ALIGN bytes, so ONNX Runtime can map them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data

WEIGHTS = "weights.data"
INLINE_BYTES = 1024  # smaller initializers (shapes, scalars) stay in the model
ALIGN = 4096


def save_models(models: dict[str, onnx.ModelProto], folder: Path) -> dict[str, int]:
    """Write `folder/{name}.onnx` for each model, their large weights in `folder/WEIGHTS` once each; the models'
    initializers are moved out of the given protos (those of subgraphs stay inline). Returns `weights` (bytes of
    WEIGHTS) and `shared` (bytes read from a copy another initializer also reads, which separate files would
    repeat)."""
    placed: dict[bytes, int] = {}  # digest of the bytes -> their offset in WEIGHTS
    shared = 0
    with open(folder / WEIGHTS, "wb") as out:
        for model in models.values():
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) <= INLINE_BYTES:
                    continue
                data = tensor.raw_data
                digest = hashlib.blake2b(data, digest_size=16).digest() + len(data).to_bytes(8, "little")
                if digest in placed:
                    offset = placed[digest]
                    shared += len(data)
                else:
                    out.write(b"\0" * (-out.tell() % ALIGN))
                    offset = placed[digest] = out.tell()
                    out.write(data)
                set_external_data(tensor, location=WEIGHTS, offset=offset, length=len(data))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
        size = out.tell()
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        onnx.save_model(model, path)
        onnx.checker.check_model(str(path))
    return {"weights": size, "shared": shared}
