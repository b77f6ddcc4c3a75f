"""The ONNX exporter lowers one decoder layer of each kind and copies it into the other layers of that kind
(export/layer_units.py, export/replicate_layers.py). The copies must be the graph that lowering every layer gives:
the same computation, bit for bit in ONNX Runtime, and the original model's logits."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
import torch

from mla_fx.export import onnx as onnx_export
from mla_fx.export.layer_units import NotRepeatable, plan_layers
from mla_fx.export.onnx_weights import bind_inline
from mla_fx.inference import build_programs
from mla_fx.loading import load_model
from mla_fx.models import hf

from _zoo import needs_hf

LAYERS = 3  # deepseek_v3: one dense layer, then two MoE layers; minicpm3: three dense layers
COMPUTE = ("MatMul", "RMSNormalization", "LatentAttention", "TopK", "Sigmoid", "Softmax")


@pytest.fixture(scope="module", params=[pytest.param(n, marks=needs_hf(n)) for n in ("deepseek_v3", "minicpm3")])
def model(request, tmp_path_factory):
    cfg = hf.hf_config(request.param)
    cfg.num_hidden_layers = LAYERS
    if hasattr(cfg, "mlp_layer_types"):
        cfg.mlp_layer_types = None
    folder = tmp_path_factory.mktemp(request.param)
    hf.build_config(cfg).model.save_pretrained(folder)
    loaded = load_model(folder)
    return request.param, loaded, build_programs(loaded)


def lowered(programs, name: str, by_layer: bool) -> tuple[ir.Model, set[int]]:
    """The program lowered with (or without) layer copies, its weights inline; and the layers whose weights the
    module handed to torch.onnx had."""
    seen: set[int] = set()
    export = torch.onnx.export

    def spy(module, *args, **kwargs):
        seen.update(int(m.group(1)) for n, _ in module.named_parameters() if (m := re.search(r"layers\.(\d+)\.", n)))
        return export(module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.onnx, "export", spy)
        program = onnx_export._lower(programs, name, "custom", onnx_export.OPSET, by_layer)
    bind_inline(program, lambda parameter: programs.weight(name, parameter))
    return program.model, seen


def run(model: ir.Model, example) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), example, strict=True)})


@pytest.mark.parametrize("name", ["step", "prefill"])
def test_copied_layers_are_the_lowered_layers(model, name):
    family, loaded, programs = model
    example = programs.step_example() if name == "step" else programs.prefill_example()
    copied, lowered_layers = lowered(programs, name, by_layer=True)
    whole, all_layers = lowered(programs, name, by_layer=False)

    kinds = {"deepseek_v3": {0, 1}, "minicpm3": {0}}[family]  # the first dense layer, the first MoE layer
    assert lowered_layers == kinds and all_layers == set(range(LAYERS))
    names = [n.name for n in copied.graph]
    assert {int(m.group(1)) for n in names if (m := re.search(r"\.layer(\d+)$", n))} == set(range(LAYERS)) - kinds
    assert not any(n.domain == "mla_fx_export" for n in copied.graph)  # the layer markers are gone
    assert [v.name for v in copied.graph.inputs] == [v.name for v in whole.graph.inputs]
    assert [v.name for v in copied.graph.outputs] == [v.name for v in whole.graph.outputs]
    ops, whole_ops = Counter(n.op_type for n in copied.graph), Counter(n.op_type for n in whole.graph)
    assert all(ops[op] == whole_ops[op] for op in COMPUTE) and whole_ops["MatMul"] > 0
    assert ops["LatentAttention" if name == "step" else "MatMul"] == whole_ops[
        "LatentAttention" if name == "step" else "MatMul"]
    assert all(ops[op] <= count for op, count in whole_ops.items())  # copies share the shape arithmetic

    got, want = run(copied, example), run(whole, example)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    if name == "prefill":  # and the original model's logits
        with torch.no_grad():
            original = loaded.module(example[0]).numpy()
        err = np.linalg.norm(got[0] - original) / np.linalg.norm(original)
        assert err < 1e-5, err


def test_layers_without_module_stacks_are_lowered_whole(model):
    _, _, programs = model
    gm = programs.prefill
    stacks = {node: node.meta.pop("nn_module_stack", None) for node in gm.graph.nodes}
    try:
        with pytest.raises(NotRepeatable, match="not delimited"):
            plan_layers(gm, programs.input_names("prefill"), programs.output_names())
        program = onnx_export.lower_program(programs, "prefill", "custom")
    finally:
        for node, stack in stacks.items():
            if stack is not None:
                node.meta["nn_module_stack"] = stack
    assert not any(".layer" in n.name for n in program.model.graph)
    assert Counter(n.op_type for n in program.model.graph)["RMSNormalization"] > 0
