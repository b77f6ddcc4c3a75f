"""The tiny HF transformers MLA zoo: builds, runs, exports with dynamic shapes, one SDPA per layer."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from torch.export import Dim  # noqa: E402

from mla_fx.models import hf  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention.default
_EXPORTED: dict[str, tuple] = {}


def _ids(b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, hf.VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _attn_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "kv_b_proj")]


def _exported(name: str):
    """(model, ExportedProgram) with dynamic batch and sequence, cached per module run."""
    if name not in _EXPORTED:
        model = hf.build(name)
        shapes = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=64)},)
        ep = torch.export.export(model, (_ids(2, 7),), dynamic_shapes=shapes, strict=False)
        _EXPORTED[name] = (model, ep.run_decompositions({}))
    return _EXPORTED[name]


@pytest.mark.parametrize("name", hf.ZOO_NAMES)
def test_config_fields(name):
    cfg = hf.hf_config(name)
    assert cfg.hidden_size == hf.HIDDEN and cfg.vocab_size == hf.VOCAB
    assert cfg.num_attention_heads == hf.HEADS
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert cfg.kv_lora_rank == hf.KV_LORA
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
        hf.QK_NOPE,
        hf.QK_ROPE,
        hf.V_HEAD,
    )
    assert cfg.v_head_dim != cfg.qk_nope_head_dim
    if name == "deepseek_v3_no_q_lora":
        assert cfg.q_lora_rank is None
    else:
        assert cfg.q_lora_rank == hf.Q_LORA
    rope = cfg.rope_parameters
    if name == "deepseek_v3_yarn":
        assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
        assert rope["mscale_all_dim"] != rope["mscale"]
    else:
        assert rope["rope_type"] == "default"
    if name.startswith("deepseek_v3"):
        assert cfg.model_type == "deepseek_v3"
        assert cfg.rope_interleave is (name != "deepseek_v3_rotate_half")
        assert cfg.first_k_dense_replace == 1 < cfg.num_hidden_layers
    elif name == "deepseek_v2":
        assert cfg.first_k_dense_replace == 1 < cfg.num_hidden_layers
    elif name == "glm4_moe_lite":
        assert cfg.mlp_layer_types == ["dense", "sparse"]
        assert cfg.rope_interleave is True
    elif name == "minicpm3":
        assert cfg.scale_emb != 1 and cfg.dim_model_base != cfg.hidden_size
    elif name == "longcat_flash":
        assert cfg.num_layers == 1 and cfg.num_hidden_layers == 2
        assert cfg.n_routed_experts == 0 and cfg.moe_topk == 0


def test_unknown_name():
    with pytest.raises(KeyError, match="deepseek_v3"):
        hf.build("nope")
    with pytest.raises(KeyError):
        hf.hf_config("deepseek_v3_nope")


@pytest.mark.parametrize("name", hf.ZOO_NAMES)
def test_build_and_forward(name):
    model = hf.build(name)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.config._experts_implementation == "batched_mm"  # captures, runs in float64, exports
    n_attn = len(_attn_modules(model))
    assert n_attn == 2
    # as in the real models: a dense first layer, then routed experts with weights (MiniCPM3 is dense)
    experts = [m for m in model.modules() if "Experts" in type(m).__name__ and m.gate_up_proj is not None]
    assert len(experts) == (0 if name in ("minicpm3", "longcat_flash") else 1), name
    ids = _ids(2, 7)
    with torch.no_grad():
        y = model(ids)
        y_again = hf.build(name, seed=0)(ids)
        y_other = hf.build(name, seed=1)(ids)
    assert y.shape == (2, 7, hf.VOCAB)
    assert torch.isfinite(y).all()
    assert y.std(dim=-1).min() > 0.3  # logits not near-constant
    assert torch.equal(y, y_again)
    assert not torch.allclose(y, y_other)


@pytest.mark.parametrize("name", hf.ZOO_NAMES)
def test_attention_not_uniform(name):
    """Eager attention probabilities of layer 0 are far from uniform, and eager == sdpa."""
    model = hf.build(name)
    ids = _ids(2, 7)
    with torch.no_grad():
        ref = model(ids)
    attn = _attn_modules(model)[0]
    probs = []
    handle = attn.register_forward_hook(lambda mod, args, out: probs.append(out[1]))
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = model(ids)
    finally:
        model.config._attn_implementation = "sdpa"
        handle.remove()
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)
    p = probs[0]  # [B, H, S, S]
    assert p.shape == (2, hf.HEADS, 7, 7)
    last = p[:, :, -1, :]  # the last query sees all 7 keys
    assert last.max(dim=-1).values.mean() > 2.0 / 7


@pytest.mark.parametrize("name", hf.ZOO_NAMES)
def test_export_dynamic_batch_and_seq(name):
    model, ep = _exported(name)
    gm = ep.module()
    for b, s in [(3, 11), (1, 1), (8, 64)]:
        ids = _ids(b, s, seed=b * 100 + s)
        with torch.no_grad():
            torch.testing.assert_close(gm(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", hf.ZOO_NAMES)
def test_export_one_sdpa_per_attention(name):
    model, ep = _exported(name)
    sdpa = [n for n in ep.graph.nodes if n.target is SDPA]
    attns = _attn_modules(model)
    assert len(sdpa) == len(attns) == 2
    for node, attn in zip(sdpa, attns, strict=True):
        assert node.kwargs.get("scale") == pytest.approx(attn.scaling)
        assert not node.kwargs.get("is_causal", False)
        assert not node.kwargs.get("enable_gqa", False)
        q, k, v = (a.meta["val"] for a in node.args[:3])
        assert q.shape[1] == k.shape[1] == v.shape[1] == hf.HEADS
        assert q.shape[-1] == k.shape[-1] == hf.QK_NOPE + hf.QK_ROPE
        assert v.shape[-1] == hf.V_HEAD


def test_yarn_softmax_scale():
    model = hf.build("deepseek_v3_yarn")
    rope = model.config.rope_parameters
    base = (hf.QK_NOPE + hf.QK_ROPE) ** -0.5
    mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
    for attn in _attn_modules(model):
        assert attn.scaling == pytest.approx(base * mscale**2)
        assert abs(attn.scaling - base) > 1e-3
    for name in ("deepseek_v3", "deepseek_v2", "minicpm3", "glm4_moe_lite", "longcat_flash"):
        assert _attn_modules(hf.build(name))[0].scaling == pytest.approx(base)


def _dense(name: str):
    cfg = hf.hf_config(name)
    if hasattr(cfg, "mlp_layer_types"):
        cfg.mlp_layer_types = ["dense"] * cfg.num_hidden_layers
    else:
        cfg.first_k_dense_replace = cfg.num_hidden_layers
    return hf.build_config(cfg)


def test_same_math_across_architectures():
    """Same seed -> same weights: V2's complex RoPE equals V3's interleaved RoPE; GLM == V3. Dense
    layers only: the routers differ (V2 softmax, V3 sigmoid with a bias, GLM its own defaults)."""
    ids = _ids(2, 7)
    with torch.no_grad():
        v3 = _dense("deepseek_v3")(ids)
        torch.testing.assert_close(_dense("deepseek_v2")(ids), v3, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(_dense("glm4_moe_lite")(ids), v3, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(_dense("deepseek_v3_rotate_half")(ids), v3, atol=1e-3)


def test_dtype():
    model = hf.build("deepseek_v3", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        assert model(_ids(1, 5)).dtype == torch.float64


def test_tiny_llama_has_no_mla():
    model = hf.tiny_llama()
    assert not _attn_modules(model)
    assert model.config.model_type == "llama"
    with torch.no_grad():
        y = model(_ids(2, 7))
    assert y.shape == (2, 7, hf.VOCAB) and torch.isfinite(y).all()


def test_absorbed_moe_program_loads_with_mla_fx_alone(tmp_path):
    """An absorbed .pt2 of a MoE model (batched_mm experts: no custom op) loads and runs in a fresh process
    that imports mla_fx and nothing of transformers."""
    import subprocess
    import sys

    from mla_fx import cli

    out = tmp_path / "moe.pt2"
    assert cli.main(["absorb", "zoo:deepseek_v3", "-o", str(out), "-q", "--dtypes", "float32"]) == 0
    script = ("import sys, torch, mla_fx\n"
              f"program = torch.export.load({str(out)!r})\n"
              "logits = program.module()(torch.randint(0, 128, (2, 7)))\n"
              "assert logits.shape == (2, 7, 128), logits.shape\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
