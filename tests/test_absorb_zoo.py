"""Acceptance: every zoo model, both modes, float64 and float32: one latent_attention per layer, no
expansion of the latent, and the same logits as the original."""

from __future__ import annotations

import pytest
import torch

from mla_fx.absorb import AbsorbConfig, absorb
from mla_fx.passes.find_mla_sites import find_sites
from mla_fx.passes.verify_latent_only import latent_readers
from mla_fx.precision import true_float64

from _zoo import LATENT, SDPA, ZOO_PARAMS, count, ids_for, rel_l2, zoo_model

LINEAR = torch.ops.aten.linear.default
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["reassociate", "fold"])
@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_absorb_zoo(name, mode, dtype):
    model, gm = zoo_model(name, dtype)
    sites, _ = find_sites(gm)
    layers = len(sites)
    assert layers >= 1 and count(gm, SDPA) >= layers
    kv_up = {s.kv_up_weight for s in sites}
    assert any(n.target is LINEAR and n.args[1].target in kv_up for n in gm.graph.nodes)

    result = absorb(gm, AbsorbConfig(mode=mode))
    out_gm = result.gm

    assert result.mode == mode
    assert count(out_gm, LATENT) == layers
    assert count(out_gm, SDPA) == 0
    # the kv up-projection weight is gone, and nothing but latent_attention reads the latent
    assert not any(n.op == "get_attr" and n.target in kv_up for n in out_gm.graph.nodes)
    for node in out_gm.graph.nodes:
        if node.target is LATENT:
            assert latent_readers(node.args[2]) == []
    if mode == "fold":
        assert result.pass_stats["absorb_uk"]["folded"] == layers
        assert result.pass_stats["absorb_uv"]["folded"] == layers

    ids = ids_for(model, seq=13)  # another length than the capture's 9: dynamic sequence
    widths = []

    class Watch(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is LATENT:
                widths.append(args[2].shape)
            return super().call_function(target, args, kwargs)

    with torch.no_grad(), true_float64(dtype):
        ref, out = model(ids), Watch(out_gm).run(ids)
    # the attention reads exactly [c_KV ; k_R] per token: d_c + d_r values, one row per token
    assert widths == [(2, 13, sites[0].spec.latent_dim)] * layers
    assert out.shape == ref.shape
    assert rel_l2(ref, out) <= TOL[dtype], f"{name} {mode} {dtype}: rel L2 {rel_l2(ref, out):.3g}"
    # a reassociated or folded product cannot round exactly like the original: 0 would mean the float64
    # comparison lost its precision somewhere (HF computes norms in float32 unless true_float64 is on)
    assert rel_l2(ref, out) > 0
