"""Sparse MLA (DeepSeek-V3.2's lightning indexer, DSA): the inference programs cache the indexer's keys beside the
latent and give the latent attention the rows a top-k selected; the programs equal HF's model, the ONNX step
reads the caches only where it should, and the ONNX function body equals the op (ONNX Runtime's generation of
every DSA architecture against HF is the sweep's: tests/_sweep_cases.py).

The tiny DeepseekV32 keeps its MoE layer and index_topk 8, and the prompts plus decode steps reach 27 cached tokens,
so most steps select 8 of more tokens: the test fails if the selection is lost (checked: dense attention differs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from _zoo import has_transformers

if not has_transformers():
    pytest.skip("the DSA models need transformers (pip install -e '.[dev]')", allow_module_level=True)

from mla_fx import ops  # noqa: E402
from mla_fx.check_backends import check_backends, default_prompts  # noqa: E402
from mla_fx.export.latent_attention_onnx import DOMAIN, SPARSE_OP_TYPE, sparse_function_proto  # noqa: E402
from mla_fx.export.onnx import cache_report, export_program  # noqa: E402
from mla_fx.inference import build_programs  # noqa: E402
from mla_fx.loading import load_model  # noqa: E402
from mla_fx.models.architectures import mla_architectures  # noqa: E402
from mla_fx.passes.add_index_cache import SPARSE_LATENT_ATTENTION  # noqa: E402
from mla_fx.passes.to_latent_attention import LATENT_ATTENTION  # noqa: E402
from mla_fx.sweep import save_tiny  # noqa: E402
from mla_fx.torch_backend import TorchBackend  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention.default
PROMPTS = (11, 4)
DECODE_STEPS = 16


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    arch = next(a for a in mla_architectures() if a.name == "deepseek_v32")
    directory = tmp_path_factory.mktemp("deepseek_v32")
    save_tiny(arch, directory)
    loaded = load_model(directory)
    programs = build_programs(loaded)
    step = export_program(programs, "step", "custom")  # ONNX Runtime's generation: the sweep's (tests/_sweep_cases)
    return loaded, programs, step, directory


def test_the_programs_cache_the_index_keys_and_read_only_the_selected_rows(v32):
    loaded, programs, *_ = v32
    layers = loaded.hf_config["num_hidden_layers"]
    step = programs.step.graph
    assert sum(n.target is SPARSE_LATENT_ATTENTION for n in step.nodes) == layers
    assert not any(n.target in (LATENT_ATTENTION, SDPA) for n in step.nodes)
    assert [c.past for c in programs.cache] == [f"past_latent.{i}" for i in range(layers)] + [
        f"past_index_keys.{i}" for i in range(layers)]
    assert {c.width for c in programs.cache if c.kind == "index_keys"} == {loaded.hf_config["index_head_dim"]}
    # the selection is k wide whatever the cache holds: one top-k per layer, of index_topk (a literal)
    topks = [n for n in step.nodes if n.target is torch.ops.aten.topk.default and n.args[1] == 8]
    assert len(topks) == layers and loaded.hf_config["index_topk"] == 8
    assert programs.output_names() == ["logits"] + [c.present for c in programs.cache]


def test_the_programs_equal_hf_with_the_selection_engaged(v32):
    loaded, programs, _, directory = v32
    prompts = default_prompts(loaded.vocab_size, PROMPTS)
    backends = [("rewritten", TorchBackend(programs))]
    comparisons = check_backends(loaded.reference(), backends, prompts, DECODE_STEPS, torch.float32)
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons if not c.passed]
    assert max(PROMPTS) + DECODE_STEPS > 2 * loaded.hf_config["index_topk"]
    # the same model attending to every token is another model here: the selection is what the check saw
    dense = load_model(directory)
    for layer in dense.module.model.model.layers:
        layer.self_attn.indexer.index_topk = 10_000
    ids = torch.tensor([prompts[0] + [1] * DECODE_STEPS])
    with torch.no_grad():
        assert (dense.reference()(ids) - loaded.reference()(ids)).abs().max() > 1e-2


def test_the_onnx_step_reads_the_caches_only_where_it_should(v32):
    _, programs, step, _ = v32
    graph = step.graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    attentions = [n for n in graph.node if n.domain == DOMAIN and n.op_type == SPARSE_OP_TYPE]
    assert len(attentions) == len(programs.sites)
    for cache in programs.cache:
        (concat,) = [n for n in readers[cache.past] if n.op_type != "Shape"]
        assert concat.op_type == "Concat" and cache.present in concat.output
        if cache.kind == "latent":  # the appended latent goes to its layer's sparse attention alone
            assert {n.op_type for n in readers[cache.present]} <= {SPARSE_OP_TYPE, "Shape"}
    rows = cache_report(ir.serde.deserialize_model(step), programs)
    assert [row["index_key_bytes"] for row in rows] == [4 * 16] * len(programs.sites)
    assert programs.index_key_dims == dict.fromkeys(range(len(programs.sites)), 16)
    assert {"TopK", "GatherND"} <= {n.op_type for n in graph.node} | {n.op_type for f in step.functions for n in f.node}


def _sparse_case(seed: int, tokens: int, top_k: int):
    g = torch.Generator().manual_seed(seed)
    b, h, s, d_c, d_r = 2, 3, 2, 8, 4
    q_latent, q_rope = torch.randn(b, h, s, d_c, generator=g), torch.randn(b, h, s, d_r, generator=g)
    latent_kv = torch.randn(b, tokens, d_c + d_r, generator=g)
    scores = torch.randn(b, s, tokens, generator=g)
    visible = torch.ones(b, s, tokens, dtype=torch.bool).tril(tokens - s)
    visible[1, :, :2] = False  # a padded row
    padded = torch.cat([scores.masked_fill(~visible, float("-inf")), torch.full((b, s, top_k), float("-inf"))], -1)
    values, indices = padded.topk(top_k)
    valid = values != float("-inf")
    return q_latent, q_rope, latent_kv, torch.where(valid, indices, 0), valid, visible


@pytest.mark.parametrize("tokens, top_k", [(6, 4), (6, 6), (5, 9)])
def test_the_sparse_op_is_the_latent_attention_over_the_selected_rows(tokens, top_k):
    q_latent, q_rope, latent_kv, indices, valid, visible = _sparse_case(0, tokens, top_k)
    out = ops.sparse_latent_attention(q_latent, q_rope, latent_kv, indices, valid, 0.3)
    selected = torch.zeros(visible.shape, dtype=torch.int64).scatter_add(-1, indices, valid.long()) > 0
    dense = ops.latent_attention_reference(q_latent, q_rope, latent_kv, selected[:, None], 0.3, False)
    torch.testing.assert_close(out, dense)
    if top_k >= tokens:  # every visible token selected: dense MLA
        assert torch.equal(selected, visible)
        full = ops.latent_attention_reference(q_latent, q_rope, latent_kv, visible[:, None], 0.3, False)
        torch.testing.assert_close(out, full)


def test_the_onnx_function_body_equals_the_op():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    q_latent, q_rope, latent_kv, indices, valid, _ = _sparse_case(1, 7, 4)
    names = ["q_latent", "q_rope", "latent_kv", "indices", "valid"]
    values = [q_latent, q_rope, latent_kv, indices, valid]
    types = [TensorProto.FLOAT] * 3 + [TensorProto.INT64, TensorProto.BOOL]
    node = helper.make_node(SPARSE_OP_TYPE, names, ["out"], domain=DOMAIN, scale=0.3, kv_lora_rank=8, rope_dim=4)
    graph = helper.make_graph([node], "sparse", [helper.make_tensor_value_info(n, t, list(v.shape)) for n, t, v in
                                                 zip(names, types, values, strict=True)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, functions=[sparse_function_proto()], ir_version=10,
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {n: v.numpy() for n, v in zip(names, values, strict=True)})
    want = ops.sparse_latent_attention(q_latent, q_rope, latent_kv, indices, valid, 0.3)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_layers_that_share_a_top_k_share_its_cached_keys(tmp_path):
    """GLM-5's shared indexers: a layer reuses the previous layer's top-k; its keys are cached once."""
    from mla_fx.models.architectures import tiny_config
    from mla_fx.models.hf import _randomise
    from mla_fx.transformers_loading import from_config

    config = tiny_config(next(a for a in mla_architectures() if a.name == "glm_moe_dsa"))
    three = {"num_hidden_layers": 3, "indexer_types": ["full", "shared", "full"],
             "layer_types": [config.layer_types[0]] * 3, "mlp_layer_types": ["dense", "sparse", "sparse"]}
    config = type(config)(**{**config.to_dict(), **three})
    model, _ = from_config(config)
    _randomise(model, 0)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    programs = build_programs(loaded)
    assert [c.past for c in programs.cache if c.kind == "index_keys"] == ["past_index_keys.0", "past_index_keys.2"]
    comparisons = check_backends(loaded.reference(), [("rewritten", TorchBackend(programs))],
                                 default_prompts(loaded.vocab_size, PROMPTS), DECODE_STEPS, torch.float32)
    assert all(c.passed for c in comparisons), [c.line() for c in comparisons if not c.passed]
