"""ONNX export of the inference programs: step.onnx and prefill.onnx plus a manifest, in one folder.

`mla-fx export MODEL --onnx -o DIR`. Opset 23, dynamic batch / new tokens / cached tokens, inputs and outputs
named like HF/optimum past_key_values:
input_ids, position_ids, attention_mask, past_latent.{i} (, past_index_keys.{i}) -> logits, present_latent.{i}
(, present_index_keys.{i}): the cache layout of :mod:`mla_fx.products`.

The exporter sees shapes only: every weight is a stand-in while the graph is lowered and optimized, and stays a
named input of the ONNX graph until :mod:`.onnx_weights` writes it (each tensor once for both programs, into
`weights.data`), read from memory or from a checkpoint's shards. So a model of any size exports in the memory of
its largest tensor.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.rewriter.onnx_fusions
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from mla_fx import pipelines
from mla_fx.errors import MLAFXError
from mla_fx.inference import InferencePrograms
from mla_fx.outputs import atomic_directory
from mla_fx.passes.manager import run_passes
from mla_fx.products import ONNX_FORMAT, ONNX_MANIFEST
from mla_fx.structure import run_on_cpu

from .latent_attention_onnx import DOMAIN, OP_TYPE, SPARSE_OP_TYPE, function_proto, sparse_function_proto
from .layer_units import NotRepeatable, plan_layers
from .onnx_weights import INLINE_BYTES, WEIGHTS, StoredWeight, bind_inline, save_models
from .replicate_layers import replicate_layers

# torch.onnx lists every optional op library it cannot find (torchvision, ...) on each export
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

OPSET = 23
IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 reads at most 13


def _dynamic_shapes(programs: InferencePrograms, name: str) -> tuple[dict[int, Any], ...]:
    batch, new = Dim("batch", min=1, max=1024), Dim("new_tokens", min=1, max=programs.max_seq)
    tokens = {0: batch, 1: new}
    if name == "prefill":
        return tokens, tokens, tokens
    past = Dim("past_tokens", min=0, max=programs.max_seq)
    return (tokens, tokens, {0: batch, 1: Dim.AUTO}, *({0: batch, 1: past} for _ in programs.cache))


@dataclass
class OnnxProgram:
    """An exported program whose weights are not in it yet. Each weight is a graph input named like the program's
    parameter (no value, so the exporter's optimizer cannot fold it or read it) until :func:`.onnx_weights.save_models`
    writes it; `weights` maps those names to the layout the graph reads (a Transpose of the parameter folded in)."""

    name: str
    model: ir.Model
    weights: dict[str, StoredWeight]


def _stand_ins(gm: torch.fx.GraphModule, buffers: Collection[str] = ()) -> set[str]:
    """Each parameter, each buffer on meta or larger than INLINE_BYTES, and the named `buffers`, replaced by a
    stand-in of its shape and dtype that holds one value (stride 0): the exporter sees shapes only, whatever the
    weights' size or device."""
    names = set()
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        is_param = isinstance(tensor, torch.nn.Parameter)
        small = not tensor.is_meta and tensor.numel() * tensor.element_size() <= INLINE_BYTES
        if not is_param and small and name not in buffers:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        stand_in = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
        if is_param:
            owner._parameters[leaf] = torch.nn.Parameter(stand_in, requires_grad=False)
        else:
            owner._buffers[leaf] = stand_in
        names.add(name)
    run_on_cpu(gm.graph)  # a program captured on meta creates its tensors (arange, masks) on meta
    gm.recompile()
    return names


def _weights_as_inputs(model: ir.Model, names: set[str]) -> list[ir.Value]:
    """The stand-ins' initializers become value-less inputs (appended after the program's own inputs)."""
    values = []
    for name in sorted(names):
        value = model.graph.initializers.pop(name, None)
        if value is None:
            continue  # a weight the exported graph does not read
        value.const_value = None
        model.graph.inputs.append(value)
        values.append(value)
    return values


def _fold_transposes(values: list[ir.Value]) -> dict[str, StoredWeight]:
    """A weight read only through Transposes of one permutation (a linear's W^T) is stored permuted, as the
    exporter's optimizer would fold it, and the Transposes go."""
    stored = {}
    for value in values:
        perm = None
        users = [node for node, _ in value.uses()]
        if users and all(n.op_type == "Transpose" and n.domain == "" for n in users):
            perms = {tuple(n.attributes["perm"].as_ints()) for n in users}
            if len(perms) == 1:
                (perm,) = perms
                for node in users:
                    ir.convenience.replace_all_uses_with(node.outputs[0], value)
                    node.graph.remove(node, safe=True)
                value.shape = ir.Shape([value.shape[i] for i in perm])
        stored[value.name] = StoredWeight(value.name, perm)
    return stored


def _order_io(model: ir.Model, inputs: list[str], outputs: list[str]) -> None:
    """The program's inputs and outputs in their documented order, the weights after them by name."""
    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    weights = sorted(set(by_name) - set(inputs))
    graph.inputs.clear()
    graph.inputs.extend([by_name[n] for n in inputs] + [by_name[n] for n in weights])
    results = {v.name: v for v in graph.outputs}
    graph.outputs.clear()
    graph.outputs.extend(results[n] for n in outputs)


def lower_program(programs: InferencePrograms, name: str, attention: str, opset: int = OPSET) -> OnnxProgram:
    """The step or prefill program in ONNX (opset `opset`, optimized), its weights left as named inputs.

    Layers alike are lowered once (:mod:`.layer_units`) and copied in ONNX (:mod:`.replicate_layers`): torch.onnx
    takes seconds per layer, and a real model has dozens of the same two or three kinds. Where the layers cannot
    be told apart, every layer is lowered."""
    try:
        return _lower(programs, name, attention, opset, by_layer=True)
    except NotRepeatable as e:
        log.info("%s program: every layer lowered (%s)", name, e)
        return _lower(programs, name, attention, opset, by_layer=False)


def _lower(programs: InferencePrograms, name: str, attention: str, opset: int, by_layer: bool) -> OnnxProgram:
    gm = copy.deepcopy(programs.step if name == "step" else programs.prefill).eval()
    example = programs.step_example() if name == "step" else programs.prefill_example()
    stand_ins = _stand_ins(gm)
    ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example)
    gm, _ = run_passes(gm, pipelines.onnx_lowering(attention))
    inputs, outputs, dynamic = programs.input_names(name), programs.output_names(), _dynamic_shapes(programs, name)
    plan = plan_layers(gm, inputs, outputs) if by_layer else None
    if plan is not None:
        stand_ins |= _stand_ins(gm, buffers=set(plan.owner))
        example = tuple(x for x, n in zip(example, inputs, strict=True) if n in plan.inputs)
        dynamic = tuple(d for d, n in zip(dynamic, inputs, strict=True) if n in plan.inputs)
    try:
        onnx_program = torch.onnx.export(
            gm, example, dynamic_shapes=dynamic, input_names=inputs if plan is None else plan.inputs,
            output_names=outputs if plan is None else plan.outputs, opset_version=opset,
            dynamo=True, optimize=False, verbose=False)
    except Exception as e:
        raise MLAFXError(f"ONNX export of the {name} program failed: {type(e).__name__}: {e}") from e
    model = onnx_program.model
    weights = _fold_transposes(_weights_as_inputs(model, stand_ins))
    # what torch.onnx.export(optimize=True) runs; the weights are inputs, so nothing folds or reads them
    onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    if plan is not None:
        replicate_layers(model, plan)
        for copied in plan.copies:
            weights.update({new: StoredWeight(new, weights[old].perm)
                            for old, new in copied.names.items() if old in weights})
        _order_io(model, inputs, outputs)
    for op_type, proto in ((OP_TYPE, function_proto), (SPARSE_OP_TYPE, sparse_function_proto)):
        if any(n.domain == DOMAIN and n.op_type == op_type for n in model.graph):
            model.functions[(DOMAIN, op_type, "")] = ir.serde.deserialize_function(proto())
    model.ir_version = min(model.ir_version, IR_VERSION)
    return OnnxProgram(name, model, weights)


def export_program(programs: InferencePrograms, name: str, attention: str, opset: int = OPSET) -> onnx.ModelProto:
    """One program as a self-contained ModelProto, its weights inline (for small models: tests, benchmarks)."""
    lowered = lower_program(programs, name, attention, opset)
    bind_inline(lowered, lambda param: programs.weight(name, param))
    return ir.serde.serialize_model(lowered.model)


def cache_report(model: ir.Model, programs: InferencePrograms) -> list[dict[str, int]]:
    """Bytes per token per layer read off the exported cache inputs, next to the other layouts."""
    rows = []
    inputs = {i.name: i for i in model.graph.inputs}
    for i, (site, cache) in enumerate(zip(programs.sites, programs.cache, strict=False)):
        value = inputs[cache.past]
        width, elem = int(value.shape[-1]), int(value.dtype.itemsize)
        values = site.spec.cache_values_per_token()
        rows.append({"layer": i, "latent_values": width, "latent_bytes": width * elem,
                     "expanded_kv_bytes": values["expanded_kv"] * elem,
                     "hf_transformers_bytes": values["hf_transformers"] * elem})
    for cache in programs.cache:  # a sparse layer's indexer keys, beside its latent
        if cache.kind == "index_keys":
            value = inputs[cache.past]
            rows[cache.layer]["index_key_bytes"] = int(value.shape[-1]) * int(value.dtype.itemsize)
    return rows


def export_onnx(programs: InferencePrograms, out: Path, *, attention: str = "custom", opset: int = OPSET,
                model_name: str = "", tokenizer: str | None = None, progress=None, quiet: bool = True,
                verify: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write step.onnx, prefill.onnx and the manifest into `out`, all or nothing. The weights are read one at a
    time (`programs.weight`: from memory, or computed from a checkpoint's shards) and written once each.

    `verify(folder)` runs on the finished export before it replaces `out`; if it raises, nothing is
    written and an earlier export at `out` stays."""
    with atomic_directory(Path(out), ONNX_MANIFEST, "mla-fx ONNX export") as tmp:
        files = {}
        for name in ("step", "prefill"):
            if progress:
                progress(f"exporting the {name} program to ONNX (opset {opset}, attention {attention})")
            files[name] = lower_program(programs, name, attention, opset)
        weights = save_models(list(files.values()), tmp, programs, quiet=quiet)
        manifest = {
            "format": ONNX_FORMAT, "model": model_name, "opset": opset, "attention": attention,
            "dtype": str(programs.dtype).removeprefix("torch."), "vocab_size": programs.vocab_size,
            "max_seq": programs.max_seq, "mode": programs.mode, "tokenizer": tokenizer,
            "programs": {name: {"file": f"{name}.onnx", "inputs": programs.input_names(name),
                                "outputs": programs.output_names()} for name in files},
            "layers": [{"latent_dim": s.spec.latent_dim, "spec": s.spec.to_dict(),
                        **({"index_key_dim": programs.index_key_dims[i]} if i in programs.index_key_dims else {})}
                       for i, s in enumerate(programs.sites)],
            "weights": {"file": WEIGHTS, **weights},
            "cache_bytes_per_token": cache_report(files["step"].model, programs),
            "crossover_tokens": programs.stats.get("crossover_tokens"),
        }
        (tmp / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify is not None:
            verify(tmp)
    return manifest
