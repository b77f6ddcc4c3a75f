"""Acceptance for the latent-cache inference programs and their ONNX export, run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mla_fx.check_backends import check_backends, default_prompts
from mla_fx.export.latent_attention_onnx import ATTRIBUTES, DOMAIN, OP_TYPE
from mla_fx.export.onnx import export_onnx
from mla_fx.inference import build_programs
from mla_fx.loading import load_model
from mla_fx.ort_backend import OnnxBackend
from mla_fx.torch_backend import TorchBackend

from _zoo import has_transformers, needs_hf

MODELS = ["reference", "reference_no_q_lora", "deepseek_v3", "deepseek_v3_rotate_half", "deepseek_v3_yarn",
          "deepseek_v2", "deepseek_v3_no_q_lora"]
_cache: dict = {}


def exported(name: str, tmp_path_factory, attention: str = "custom"):
    key = (name, attention)
    if key not in _cache:
        loaded = load_model(f"zoo:{name}")
        programs = build_programs(loaded)
        out = tmp_path_factory.mktemp(f"{name}-{attention}")
        manifest = export_onnx(programs, out / "export", attention=attention, model_name=name)
        _cache[key] = loaded, programs, out / "export", manifest
    return _cache[key]


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_hf(n)) for n in MODELS])
def test_onnx_runtime_matches_the_original_for_prefill_and_64_decode_steps(name, tmp_path_factory):
    loaded, programs, folder, _ = exported(name, tmp_path_factory)
    prompts = default_prompts(loaded.vocab_size, lengths=(9, 3))  # a batch of two, left-padded
    comparisons = check_backends(loaded.reference(), [("rewritten", TorchBackend(programs)),
                                                      ("onnxruntime", OnnxBackend(folder))], prompts, 64,
                                 torch.float32)
    failed = [c.line() for c in comparisons if not c.passed]
    assert not failed, failed
    names = [c.name for c in comparisons]
    assert "decode logits[onnxruntime, 64 steps]" in names and "generation[onnxruntime, greedy]" in names
    assert all(c.rel_l2 <= 1e-4 for c in comparisons)


def test_standard_attention_op_export_matches_too(tmp_path_factory):
    loaded, programs, folder, _ = exported("reference", tmp_path_factory, attention="standard")
    step = onnx.load(folder / "step.onnx")
    assert not any(n.domain == DOMAIN for n in step.graph.node)
    assert sum(n.op_type == "Attention" for n in step.graph.node) == len(programs.sites)
    comparisons = check_backends(loaded.reference(), [("onnxruntime", OnnxBackend(folder))],
                                 default_prompts(loaded.vocab_size), 8, torch.float32)
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def test_step_graph_reads_the_cache_only_through_latent_attention(tmp_path_factory):
    _, programs, folder, _ = exported("reference", tmp_path_factory)
    graph = onnx.load(folder / "step.onnx").graph
    users = _consumers(graph)
    outputs = {o.name for o in graph.output}
    for i in range(len(programs.sites)):
        # past rows + this step's rows; besides that only its length is read (Shape, no data)
        (concat,) = [n for n in users[f"past_latent.{i}"] if n.op_type != "Shape"]
        assert concat.op_type == "Concat"
        (row,) = concat.output
        readers = users.get(row, [])
        assert [n.op_type for n in readers] == [OP_TYPE] and row in outputs  # read once, returned as present
    # and no expansion through W_UK / W_UV: no MatMul or Gemm anywhere downstream of a cache input
    # except through the latent attention's output (whose size does not depend on the cache length)
    frontier, reached = [f"past_latent.{i}" for i in range(len(programs.sites))], set()
    while frontier:
        name = frontier.pop()
        for node in users.get(name, []):
            if node.op_type in (OP_TYPE, "Shape") or id(node) in reached:
                continue
            reached.add(id(node))
            assert node.op_type == "Concat", f"{node.op_type} reads the cache"
            frontier += list(node.output)


def test_cache_is_exactly_the_latent_row_and_the_report_says_so(tmp_path_factory):
    _, programs, folder, manifest = exported("deepseek_v3" if has_transformers() else "reference",
                                             tmp_path_factory)
    step = onnx.load(folder / "step.onnx")
    ins = {i.name: i for i in step.graph.input}
    outs = {o.name: o for o in step.graph.output}
    for i, site in enumerate(programs.sites):
        width = site.spec.kv_lora_rank + site.spec.qk_rope_head_dim
        for t in (ins[f"past_latent.{i}"], outs[f"present_latent.{i}"]):
            dims = t.type.tensor_type.shape.dim
            assert len(dims) == 3 and dims[2].dim_value == width and not dims[1].dim_value  # dynamic tokens
        row = manifest["cache_bytes_per_token"][i]
        assert row["latent_values"] == width and row["latent_bytes"] == 4 * width
        assert row["expanded_kv_bytes"] == 4 * site.spec.n_heads * (
            site.spec.qk_nope_head_dim + site.spec.qk_rope_head_dim + site.spec.v_head_dim)


def test_latent_attention_node_carries_the_registered_attributes_and_a_function_body(tmp_path_factory):
    _, programs, folder, _ = exported("reference", tmp_path_factory)
    step = onnx.load(folder / "step.onnx")
    nodes = [n for n in step.graph.node if n.domain == DOMAIN]
    assert len(nodes) == len(programs.sites) and all(n.op_type == OP_TYPE for n in nodes)
    for node, site in zip(nodes, programs.sites, strict=True):
        assert [(a.name, a.type) for a in node.attribute] == list(ATTRIBUTES)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["scale"] == pytest.approx(site.spec.softmax_scale, rel=1e-6)
        assert (attrs["kv_lora_rank"], attrs["rope_dim"]) == (site.spec.kv_lora_rank, site.spec.qk_rope_head_dim)
        assert attrs["plugin_namespace"] == b"mla_fx"
    (function,) = [f for f in step.functions if f.domain == DOMAIN]
    assert function.name == OP_TYPE and list(function.attribute) == [name for name, _ in ATTRIBUTES]
    assert {n.op_type for n in function.node} >= {"Attention", "Concat", "Slice"}
    assert not any(a.name == "is_causal" for n in function.node for a in n.attribute)


def test_empty_past_and_single_token_steps_run(tmp_path_factory):
    loaded, programs, folder, _ = exported("reference", tmp_path_factory)
    backend = OnnxBackend(folder)
    ids = np.array([[3, 4, 5]], dtype=np.int64)
    empty = [np.zeros((1, 0, d), np.float32) for d in (c.width for c in backend.cache)]
    logits, present = backend.step(ids, np.arange(3)[None], np.ones((1, 3), np.int64), empty)
    assert logits.shape == (1, 3, loaded.vocab_size) and [p.shape for p in present] == [
        (1, 3, d) for d in (c.width for c in backend.cache)]
    ref = loaded.reference()(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_step_and_prefill_share_one_copy_of_the_weights(tmp_path_factory):
    """Every large weight is external data in weights.data, stored once: what both programs read (embeddings,
    projections, experts, lm_head) is one range read by both; only the weights the absorption changes differ."""
    from mla_fx.export.onnx_weights import INLINE_BYTES, WEIGHTS

    loaded, _, folder, manifest = exported("deepseek_v3", tmp_path_factory)
    ranges = {}
    for name in ("step", "prefill"):
        model = onnx.load(folder / f"{name}.onnx", load_external_data=False)
        external = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {e["location"] for e in external.values()} == {WEIGHTS}
        assert all(len(t.raw_data) <= INLINE_BYTES for t in model.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL)
        ranges[name] = {(int(e["offset"]), int(e["length"])) for e in external.values()}
    shared = ranges["step"] & ranges["prefill"]
    assert sum(n for _, n in shared) == manifest["weights"]["shared"] > 0
    assert (folder / WEIGHTS).stat().st_size == manifest["weights"]["weights"]
    assert manifest["weights"]["weights"] < sum(n for r in ranges.values() for _, n in r)  # one copy, not two
    (embedding,) = [t for t in onnx.load(folder / "step.onnx").graph.initializer
                    if t.name == "model.model.embed_tokens.weight"]
    weights = dict(loaded.module.named_parameters())
    assert np.array_equal(onnx.numpy_helper.to_array(embedding, base_dir=str(folder)),
                          weights["model.model.embed_tokens.weight"].detach().numpy())
