"""The reference MLA model (mla_fx.models.reference), the tokenizer and the shipped tiny trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.export import Dim

from mla_fx.check import greedy
from mla_fx.errors import LoadError
from mla_fx.models import tokenizer
from mla_fx.models.reference import (
    MLAConfig,
    MLAForCausalLM,
    apply_rope,
    build_reference,
    rope_inv_freq,
    tiny_config,
)
from mla_fx.models.trained import TINY_MLA_DIR, load_reference_dir, load_tiny_mla

YARN_V3 = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}


def _ids(shape, vocab=128, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_parameter_names():
    cfg = tiny_config()
    model = build_reference(cfg)
    assert model(_ids((2, 7))).shape == (2, 7, cfg.vocab_size)
    attn = model.layers[0].attn
    H = cfg.num_heads
    expected = {"w_dq": (48, 64), "w_uq": (H * 16, 48), "w_qr": (H * 8, 48), "w_dkv": (32, 64),
                "w_kr": (8, 64), "w_uk": (H * 16, 32), "w_uv": (H * 12, 32), "w_o": (64, H * 12)}
    for name, shape in expected.items():
        lin = getattr(attn, name)
        assert tuple(lin.weight.shape) == shape and lin.bias is None, name
    assert not hasattr(attn, "w_q")

    no_lora = build_reference(tiny_config(q_lora_rank=None))
    a = no_lora.layers[0].attn
    assert tuple(a.w_q.weight.shape) == (H * 16, 64) and tuple(a.w_qr.weight.shape) == (H * 8, 64)
    assert not hasattr(a, "w_dq") and not hasattr(a, "q_norm")
    assert no_lora(_ids((1, 5))).shape == (1, 5, 128)


def test_attention_is_not_uniform():
    cfg = tiny_config()
    model = build_reference(cfg)
    attn, h = model.layers[0].attn, model.layers[0].attn_norm(model.embed(_ids((1, 16))))
    c_q = attn.q_norm(attn.w_dq(h))
    q = attn.w_uq(c_q).view(1, 16, 4, 16).transpose(1, 2)
    k = attn.w_uk(attn.kv_norm(attn.w_dkv(h))).view(1, 16, 4, 16).transpose(1, 2)
    p = torch.softmax((q @ k.transpose(-1, -2) * cfg.softmax_scale), dim=-1)
    assert p.max(-1).values.mean() > 2.0 / 16  # far from the uniform 1/16


def test_causal():
    model = build_reference(tiny_config())
    ids = _ids((2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 128
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_layout": "rotate_half", "yarn": YARN_V3}])
def test_export_dynamic_batch_and_seq_matches_eager(overrides):
    cfg = tiny_config(**overrides)
    model = build_reference(cfg)
    dyn = ({0: Dim("batch", min=1, max=16), 1: Dim("seq", min=1, max=cfg.max_position_embeddings)},)
    ep = torch.export.export(model, (_ids((2, 9)),), dynamic_shapes=dyn, strict=False).run_decompositions({})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    mod = ep.module()
    for shape in [(3, 17), (1, 1), (1, cfg.max_position_embeddings)]:
        ids = _ids(shape, seed=shape[1])
        with torch.no_grad():
            torch.testing.assert_close(mod(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_softmax_scale_yarn():
    plain = tiny_config()
    assert plain.softmax_scale == pytest.approx(24 ** -0.5)
    cfg = tiny_config(yarn=YARN_V3)
    mscale = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(24 ** -0.5 * mscale**2)
    assert cfg.softmax_scale != pytest.approx(24 ** -0.5)
    assert cfg.softmax_scale != pytest.approx((32 + 8) ** -0.5)  # the absorbed width d_c + d_r: wrong
    # DeepSeek-V3 sizes: 192^-0.5 * mscale^2, never 576^-0.5
    v3 = tiny_config(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, yarn=YARN_V3)
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * mscale**2)
    assert abs(v3.softmax_scale - 576 ** -0.5) > 0.01
    # mscale_all_dim absent or 0: no correction to the softmax scale; mscale/mscale_all_dim scales cos/sin
    no_all = tiny_config(yarn={"factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0})
    assert no_all.softmax_scale == pytest.approx(24 ** -0.5)
    assert rope_inv_freq(no_all)[1] == pytest.approx(mscale)
    assert rope_inv_freq(cfg)[1] == pytest.approx(1.0)
    # YaRN keeps the highest frequencies and interpolates the lowest by 1/factor
    base, _ = rope_inv_freq(plain)
    yarn, _ = rope_inv_freq(cfg)
    assert yarn[0] == pytest.approx(base[0]) and yarn[-1] == pytest.approx(base[-1] / 40)
    # factor 1: YaRN is the identity
    assert tiny_config(yarn={**YARN_V3, "factor": 1}).softmax_scale == pytest.approx(24 ** -0.5)


def test_rope_layouts_differ_and_both_are_rotations():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    inv, _ = rope_inv_freq(tiny_config())
    freqs = torch.outer(torch.arange(5, dtype=torch.float64), inv)
    cos, sin = freqs.cos(), freqs.sin()
    inter, half = apply_rope(x, cos, sin, "interleaved"), apply_rope(x, cos, sin, "rotate_half")
    assert not torch.allclose(inter, half)
    for y in (inter, half):  # rotations keep norms; position 0 is the identity
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
        torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    # an interleaved layout is rotate-half after permuting the rope dims [0,2,4,...,1,3,5,...]
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    torch.testing.assert_close(inter[..., perm], apply_rope(x[..., perm], cos, sin, "rotate_half"))

    a = build_reference(tiny_config(rope_layout="interleaved"))
    b = MLAForCausalLM(tiny_config(rope_layout="rotate_half")).eval()
    b.load_state_dict(a.state_dict())
    ids = _ids((1, 10))
    la, lb = a(ids), b(ids)
    assert torch.isfinite(la).all() and torch.isfinite(lb).all()
    assert (la - lb).abs().max() > 1e-3


def test_float64_matches_float32():
    model = build_reference(tiny_config())
    ids = _ids((2, 11))
    ref = model(ids)
    torch.testing.assert_close(model.double()(ids).float(), ref, rtol=1e-4, atol=1e-4)


def test_config_round_trip_and_validation():
    cfg = tiny_config(yarn=YARN_V3, q_lora_rank=None)
    d = cfg.to_dict()
    assert d["model_type"] == "mla_fx_reference"
    assert MLAConfig.from_dict(json.loads(json.dumps(d))) == cfg
    bad = [({"num_heads": 0}, "num_heads"), ({"kv_lora_rank": "32"}, "kv_lora_rank"),
           ({"rope_layout": "complex"}, "rope_layout"), ({"qk_rope_head_dim": 7}, "even"),
           ({"yarn": {"factor": 4}}, "original_max_position_embeddings"),
           ({"yarn": {**YARN_V3, "alpha": 1}}, "unknown"), ({"model_type": "deepseek_v3"}, "model_type"),
           ({"bogus": 1}, "unknown fields")]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            MLAConfig.from_dict({**d, **change})
    missing = dict(d)
    del missing["hidden_size"]
    with pytest.raises(ValueError, match="missing"):
        MLAConfig.from_dict(missing)


def test_tokenizer_round_trip():
    text = "The caf\u00e9 \u2014 def f(x):\n    return x"
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([0xFF, 65]) == "\ufffdA"


def test_shipped_model_loads_and_generates_text():
    files = {p.name for p in TINY_MLA_DIR.iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert sum(p.stat().st_size for p in TINY_MLA_DIR.iterdir()) <= 4 * 2**20
    model = load_tiny_mla()
    assert not model.training and model.config.rope_layout == "interleaved"
    assert model.config.q_lora_rank is not None
    prompt = torch.tensor([tokenizer.encode("The ")])
    out = greedy(model, prompt, 64)
    assert out.shape == (1, 64)
    assert torch.equal(out, greedy(model, prompt, 64))
    text = tokenizer.decode(out[0].tolist())
    letters = sum(ch.isascii() and (ch.isalpha() or ch == " ") for ch in text)
    assert letters / len(text) > 0.7, text
    assert len(set(text.split())) >= 3, text  # several distinct words, not one repeated byte


def test_load_reference_dir_errors(tmp_path):
    with pytest.raises(LoadError, match="config.json"):
        load_reference_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((TINY_MLA_DIR / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LoadError, match="model_type"):
        load_reference_dir(tmp_path)
    cfg = json.loads((TINY_MLA_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(LoadError, match="cannot load weights"):
        load_reference_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_reference_dir(tmp_path, torch.float64).lm_head.weight.dtype == torch.float64
