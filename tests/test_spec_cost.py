"""MLASpec from configs and graphs, cache sizes, and the absorption cost model."""

from __future__ import annotations

import math

import pytest
import torch

from mla_fx.cost import choose_mode, mode_costs
from mla_fx.passes.find_mla_sites import find_sites
from mla_fx.spec import MLASpec

from _zoo import HF_NAMES, has_transformers, needs_hf, zoo_model

V3 = dict(model_type="deepseek_v3", num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
          qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, hidden_size=7168, rope_interleave=True,
          rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                        "original_max_position_embeddings": 4096})


def test_deepseek_v3_cache_is_576_values_per_token_against_40960_expanded():
    spec = MLASpec.from_hf_config(V3)
    assert spec.cache_values_per_token() == {"expanded_kv": 40960, "hf_transformers": 576, "latent": 576}
    assert spec.cache_bytes_per_token(2) == {"expanded_kv": 81920, "hf_transformers": 1152, "latent": 1152}
    assert spec.rope_layout == "interleaved"


def test_yarn_scale_uses_mscale_all_dim_and_is_not_the_latent_width():
    spec = MLASpec.from_hf_config(V3)
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert spec.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)
    assert spec.softmax_scale != pytest.approx(576 ** -0.5) and spec.softmax_scale != pytest.approx(192 ** -0.5)
    no_yarn = MLASpec.from_hf_config({**V3, "rope_scaling": None})
    assert no_yarn.softmax_scale == pytest.approx(192 ** -0.5)


def test_cost_model_prefers_reassociate_at_deepseek_sizes():
    spec = MLASpec.from_hf_config(V3)
    costs = mode_costs(spec)
    # W_UQ + W_UK + W_UV + W_O against W_UK^T W_UQ + W_O W_UV (per layer)
    assert costs["reassociate"].params == 128 * 128 * 1536 + 2 * 128 * 128 * 512 + 7168 * 128 * 128
    assert costs["fold"].params == 128 * 512 * 1536 + 7168 * 128 * 512
    assert costs["fold"].flops_per_token == 2 * costs["fold"].params
    assert choose_mode([spec]) == "reassociate"


def test_cost_model_prefers_fold_when_the_latent_is_narrow():
    spec = MLASpec(n_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=32, qk_rope_head_dim=8,
                   v_head_dim=32, softmax_scale=0.1, hidden_size=64)
    assert mode_costs(spec)["fold"].params < mode_costs(spec)["reassociate"].params
    assert choose_mode([spec]) == "fold"


def test_spec_validates():
    with pytest.raises(ValueError, match="rope_layout"):
        MLASpec(4, None, 8, 8, 8, 8, 0.1, rope_layout="sideways")
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLASpec(4, None, 0, 8, 8, 8, 0.1)
    with pytest.raises(ValueError, match="no MLA fields"):
        MLASpec.from_hf_config({"model_type": "llama", "num_attention_heads": 4})


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_hf(n)) for n in HF_NAMES])
def test_spec_read_from_the_graph_equals_the_spec_from_the_hf_config(name):
    model, gm = zoo_model(name)
    sites, rejected = find_sites(gm)
    assert not rejected
    from_config = MLASpec.from_hf_config(model.config)
    for site in sites:
        got = site.spec
        assert (got.n_heads, got.q_lora_rank, got.kv_lora_rank, got.qk_nope_head_dim, got.qk_rope_head_dim,
                got.v_head_dim, got.hidden_size) == (
            from_config.n_heads, from_config.q_lora_rank, from_config.kv_lora_rank, from_config.qk_nope_head_dim,
            from_config.qk_rope_head_dim, from_config.v_head_dim, from_config.hidden_size)
        assert got.softmax_scale == pytest.approx(from_config.softmax_scale, rel=1e-9)
        if from_config.rope_layout != "complex":
            assert got.rope_layout == from_config.rope_layout


def test_yarn_zoo_models_carry_the_yarn_scale_into_the_latent_attention():
    for name in ("reference_yarn",) + (("deepseek_v3_yarn",) if has_transformers() else ()):
        model, gm = zoo_model(name)
        (site, *_), _ = find_sites(gm)
        spec = site.spec
        assert spec.softmax_scale != pytest.approx(spec.default_scale)
        assert spec.softmax_scale != pytest.approx(spec.latent_dim ** -0.5)
        from mla_fx.absorb import absorb

        out = absorb(gm).gm
        scales = [n.args[4] for n in out.graph.nodes if n.target is torch.ops.mla_fx.latent_attention.default]
        assert scales and all(s == pytest.approx(spec.softmax_scale) for s in scales)
