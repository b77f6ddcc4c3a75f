"""The mla_fx ops against torch's own attention: same function, fake impls usable by torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mla_fx  # noqa: F401

split_op = torch.ops.mla_fx.split_rope_attention
latent_op = torch.ops.mla_fx.latent_attention


def _inputs(b=2, h=4, s=5, t=5, dn=16, dr=8, dv=12, dc=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(q_nope=r(b, h, s, dn), q_rope=r(b, h, s, dr), k_nope=r(b, h, t, dn), k_rope=r(b, 1, t, dr),
                v=r(b, h, t, dv), q_lat=r(b, h, s, dc), c_kv=r(b, t, dc), k_r=r(b, t, dr))


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float"])
def test_split_rope_attention_equals_sdpa_on_concatenated_heads(mask_kind):
    x = _inputs()
    q = torch.cat([x["q_nope"], x["q_rope"]], -1)
    k = torch.cat([x["k_nope"], x["k_rope"].expand(-1, 4, -1, -1)], -1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True  # every query sees at least one key
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    causal = mask_kind == "causal"
    ref = F.scaled_dot_product_attention(q, k, x["v"], attn_mask=mask, is_causal=causal, scale=0.3)
    out = split_op(x["q_nope"], x["q_rope"], x["k_nope"], x["k_rope"], x["v"], mask, 0.3, causal)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_latent_attention_is_split_attention_over_the_latent_row():
    x = _inputs()
    latent = torch.cat([x["c_kv"], x["k_r"]], -1)  # [B, T, d_c + d_r]
    c = x["c_kv"].unsqueeze(1)
    ref = split_op(x["q_lat"], x["q_rope"], c, x["k_r"].unsqueeze(1), c, None, 0.2, True)
    out = latent_op(x["q_lat"], x["q_rope"], latent, None, 0.2, True)
    assert out.shape == (2, 4, 5, 32)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_causal_is_bottom_right_aligned_for_decode():
    """One new query over T cached rows sees all of them (the decode convention), unlike SDPA's top-left."""
    x = _inputs(s=1, t=6)
    latent = torch.cat([x["c_kv"], x["k_r"]], -1)
    causal = latent_op(x["q_lat"], x["q_rope"], latent, None, 0.2, True)
    full = latent_op(x["q_lat"], x["q_rope"], latent, None, 0.2, False)
    torch.testing.assert_close(causal, full)


def test_fully_masked_rows_give_zeros_not_nan():
    x = _inputs()
    latent = torch.cat([x["c_kv"], x["k_r"]], -1)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, 2] = False
    out = latent_op(x["q_lat"], x["q_rope"], latent, mask, 0.2, False)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[0, :, 2]) == 0


def test_low_precision_accumulates_in_float32():
    x = _inputs()
    latent = torch.cat([x["c_kv"], x["k_r"]], -1)
    ref = latent_op(x["q_lat"], x["q_rope"], latent, None, 0.2, True)
    bf = latent_op(x["q_lat"].bfloat16(), x["q_rope"].bfloat16(), latent.bfloat16(), None, 0.2, True)
    assert bf.dtype == torch.bfloat16
    assert ((bf.double() - ref).norm() / ref.norm()) < 2e-2


def test_ops_pass_torch_library_opcheck():
    x = {k: v.float() for k, v in _inputs().items()}
    latent = torch.cat([x["c_kv"], x["k_r"]], -1)
    torch.library.opcheck(latent_op, (x["q_lat"], x["q_rope"], latent, None, 0.2, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(split_op, (x["q_nope"], x["q_rope"], x["k_nope"], x["k_rope"], x["v"], None, 0.2, True),
                          test_utils=("test_schema", "test_faketensor"))
