"""ONNX export of the inference programs: step.onnx and prefill.onnx plus a manifest, in one folder.

`mla-fx export MODEL --onnx -o DIR`. Opset 23, dynamic batch / new tokens / cached tokens, the weights of both
programs in one external-data file (`weights.data`, each tensor once: :mod:`.onnx_weights`), inputs and outputs
named like HF/optimum past_key_values:
input_ids, position_ids, attention_mask, past_latent.{i} -> logits, present_latent.{i}.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from mla_fx import pipelines
from mla_fx.errors import MLAFXError
from mla_fx.inference import InferencePrograms
from mla_fx.outputs import atomic_directory
from mla_fx.passes.manager import run_passes
from mla_fx.products import ONNX_FORMAT, ONNX_MANIFEST, past_name

from .latent_attention_onnx import DOMAIN, function_proto
from .onnx_weights import WEIGHTS, save_models

# torch.onnx lists every optional op library it cannot find (torchvision, ...) on each export
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

OPSET = 23
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 reads at most 13
ONNX_ELEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                   onnx.TensorProto.DOUBLE: 8}


def _dynamic_shapes(programs: InferencePrograms, name: str) -> tuple[dict[int, Any], ...]:
    batch, new = Dim("batch", min=1, max=1024), Dim("new_tokens", min=1, max=programs.max_seq)
    tokens = {0: batch, 1: new}
    if name == "prefill":
        return tokens, tokens, tokens
    past = Dim("past_tokens", min=0, max=programs.max_seq)
    return (tokens, tokens, {0: batch, 1: Dim.AUTO}, *({0: batch, 1: past} for _ in programs.sites))


def export_program(programs: InferencePrograms, name: str, attention: str, opset: int = OPSET) -> onnx.ModelProto:
    gm = copy.deepcopy(programs.step if name == "step" else programs.prefill).eval()
    example = programs.step_example() if name == "step" else programs.prefill_example()
    ShapeProp(gm).propagate(*example)
    gm, _ = run_passes(gm, pipelines.onnx_lowering(attention))
    try:
        onnx_program = torch.onnx.export(
            gm, example, dynamic_shapes=_dynamic_shapes(programs, name), input_names=programs.input_names(name),
            output_names=programs.output_names(), opset_version=opset, dynamo=True, optimize=True, verbose=False)
    except Exception as e:
        raise MLAFXError(f"ONNX export of the {name} program failed: {type(e).__name__}: {e}") from e
    model = onnx_program.model_proto
    if any(n.domain == DOMAIN for n in model.graph.node):
        model.functions.append(function_proto())
    model.ir_version = min(model.ir_version, IR_VERSION)
    return model


def cache_report(model: onnx.ModelProto, programs: InferencePrograms) -> list[dict[str, int]]:
    """Bytes per token per layer read off the exported cache inputs, next to the other layouts."""
    rows = []
    inputs = {i.name: i for i in model.graph.input}
    for i, site in enumerate(programs.sites):
        t = inputs[past_name(i)].type.tensor_type
        width, elem = t.shape.dim[-1].dim_value, ONNX_ELEM_BYTES[t.elem_type]
        values = site.spec.cache_values_per_token()
        rows.append({"layer": i, "latent_values": width, "latent_bytes": width * elem,
                     "expanded_kv_bytes": values["expanded_kv"] * elem,
                     "hf_transformers_bytes": values["hf_transformers"] * elem})
    return rows


def export_onnx(programs: InferencePrograms, out: Path, *, attention: str = "custom", opset: int = OPSET,
                model_name: str = "", tokenizer: str | None = None, progress=None,
                verify: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write step.onnx, prefill.onnx and the manifest into `out`, all or nothing.

    `verify(folder)` runs on the finished export before it replaces `out`; if it raises, nothing is
    written and an earlier export at `out` stays."""
    with atomic_directory(Path(out), ONNX_MANIFEST, "mla-fx ONNX export") as tmp:
        files = {}
        for name in ("step", "prefill"):
            if progress:
                progress(f"exporting the {name} program to ONNX (opset {opset}, attention {attention})")
            files[name] = export_program(programs, name, attention, opset)
        weights = save_models(files, tmp)
        manifest = {
            "format": ONNX_FORMAT, "model": model_name, "opset": opset, "attention": attention,
            "dtype": str(programs.dtype).removeprefix("torch."), "vocab_size": programs.vocab_size,
            "max_seq": programs.max_seq, "mode": programs.mode, "tokenizer": tokenizer,
            "programs": {name: {"file": f"{name}.onnx", "inputs": programs.input_names(name),
                                "outputs": programs.output_names()} for name in files},
            "layers": [{"latent_dim": s.spec.latent_dim, "spec": s.spec.to_dict()} for s in programs.sites],
            "weights": {"file": WEIGHTS, **weights},
            "cache_bytes_per_token": cache_report(files["step"], programs),
            "crossover_tokens": programs.stats.get("crossover_tokens"),
        }
        (tmp / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify is not None:
            verify(tmp)
    return manifest
