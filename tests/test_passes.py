"""One test per pass: ops counted before and after, ops that must not remain, then the numbers."""

from __future__ import annotations

import pytest
import torch

from mla_fx.errors import NoMLAError, PassError
from mla_fx.passes.absorb_uk import absorb_uk
from mla_fx.passes.absorb_uv import absorb_uv
from mla_fx.passes.cleanup import cleanup
from mla_fx.passes.context import PassContext
from mla_fx.passes.find_mla_sites import find_mla_sites
from mla_fx.passes.manager import PassResult, run_passes
from mla_fx.passes.split_rope_score import SPLIT_ATTENTION, split_rope_score
from mla_fx.passes.to_latent_attention import to_latent_attention
from mla_fx.passes.verify_latent_only import verify_latent_only

from _zoo import LATENT, SDPA, count, has_transformers, ids_for, rel_l2, zoo_model

aten = torch.ops.aten
LINEAR = aten.linear.default
EINSUM = aten.einsum.default
REASSOC, FOLD = PassContext(mode="reassociate"), PassContext(mode="fold")
LAYERS = 2


def _kv_up_linears(gm) -> int:
    return sum(n.target is LINEAR and ("w_uk" in n.args[1].target or "w_uv" in n.args[1].target)
               for n in gm.graph.nodes)


def _same_numbers(model, gm, tol=1e-10):
    ids = ids_for(model, seq=11)
    with torch.no_grad():
        assert rel_l2(model(ids), gm(ids)) <= tol


def _run(gm, passes, config=REASSOC):
    return run_passes(gm, passes, config)[0]


def test_find_mla_sites_reports_every_layer_without_changing_the_graph():
    model, gm = zoo_model("reference", torch.float64)
    code = gm.code
    result = find_mla_sites(gm, REASSOC)
    assert not result.modified and gm.code == code
    assert result.stats["sites"] == LAYERS
    spec = result.stats["specs"][0]["spec"]
    assert (spec["n_heads"], spec["kv_lora_rank"], spec["qk_nope_head_dim"], spec["qk_rope_head_dim"],
            spec["v_head_dim"], spec["q_lora_rank"], spec["hidden_size"]) == (4, 32, 16, 8, 12, 48, 64)
    assert spec["rope_layout"] == "interleaved"


def test_split_rope_score():
    model, gm = zoo_model("reference", torch.float64)
    assert count(gm, SDPA) == LAYERS and count(gm, SPLIT_ATTENTION) == 0
    cats_before = count(gm, aten.cat.default)
    gm = _run(gm, [split_rope_score])
    assert count(gm, SDPA) == 0 and count(gm, SPLIT_ATTENTION) == LAYERS
    # the q and k concatenations (and the k_rope broadcast to every head) are gone
    assert count(gm, aten.cat.default) == cats_before - 2 * LAYERS
    assert count(gm, aten.expand.default) == 0
    _same_numbers(model, gm)


@pytest.mark.parametrize("config", [REASSOC, FOLD], ids=["reassociate", "fold"])
def test_absorb_uk(config):
    model, gm = zoo_model("reference", torch.float64)
    gm = _run(gm, [split_rope_score])
    w_uk_linears = sum(n.target is LINEAR and "w_uk" in n.args[1].target for n in gm.graph.nodes)
    assert w_uk_linears == LAYERS
    gm = _run(gm, [absorb_uk], config)
    # k_nope is no longer computed from the latent: the W_UK linear over cached tokens is gone
    assert sum(n.target is LINEAR and "w_uk" in str(n.args[1].target) and "attention" not in str(n.args[1].target)
               for n in gm.graph.nodes) == 0
    if config is REASSOC:
        assert count(gm, EINSUM) == LAYERS  # q_nope @ W_UK per head
    else:
        assert count(gm, EINSUM) == 0 and sum("w_uqk" in str(n.target) for n in gm.graph.nodes) == LAYERS
    _same_numbers(model, gm)


@pytest.mark.parametrize("config", [REASSOC, FOLD], ids=["reassociate", "fold"])
def test_absorb_uv(config):
    model, gm = zoo_model("reference", torch.float64)
    gm = _run(gm, [split_rope_score, absorb_uk], config)
    assert sum(n.target is LINEAR and "w_uv" in str(n.args[1].target) for n in gm.graph.nodes) == LAYERS
    gm = _run(gm, [absorb_uv], config)
    assert sum(n.target is LINEAR and str(n.args[1].target).endswith("w_uv.weight") for n in gm.graph.nodes) == 0
    for node in gm.graph.nodes:
        if node.target is SPLIT_ATTENTION:
            assert node.args[2] is node.args[4]  # keys and values are both the latent
    if config is FOLD:
        assert sum("w_ov" in str(n.target) for n in gm.graph.nodes) == LAYERS
    _same_numbers(model, gm)


def test_to_latent_attention():
    model, gm = zoo_model("reference", torch.float64)
    gm = _run(gm, [split_rope_score, absorb_uk, absorb_uv])
    gm = _run(gm, [to_latent_attention])
    assert count(gm, SPLIT_ATTENTION) == 0 and count(gm, LATENT) == LAYERS
    _same_numbers(model, gm)


def test_to_latent_attention_refuses_an_unabsorbed_value():
    _, gm = zoo_model("reference", torch.float64)
    gm = _run(gm, [split_rope_score, absorb_uk])
    result = to_latent_attention(gm)
    assert not result.modified and len(result.stats["skipped"]) == LAYERS
    assert all("absorb_uv" in why for why in result.stats["skipped"].values())


def test_verify_latent_only_catches_a_remaining_expansion():
    _, gm = zoo_model("reference", torch.float64)
    with pytest.raises(PassError, match="still an expanded MLA attention"):
        run_passes(gm, [split_rope_score, absorb_uk, verify_latent_only], REASSOC)


def test_cleanup_drops_the_weights_absorption_made_dead():
    model, gm = zoo_model("reference", torch.float64)
    gm = _run(gm, [split_rope_score, absorb_uk, absorb_uv, to_latent_attention])
    names = dict(gm.named_parameters())
    assert any(k.endswith("w_uk.weight") for k in names)  # dead but still held
    result = cleanup(gm)
    names = dict(result.gm.named_parameters())
    assert not any(k.endswith(("w_uk.weight", "w_uv.weight")) for k in names)
    assert result.stats["params_after"] < result.stats["params_before"]
    _same_numbers(model, result.gm)


def test_pass_manager_names_the_failing_pass_and_its_predecessors():
    _, gm = zoo_model("reference")

    def broken(gm, config):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match=r"pass broken failed after \['split_rope_score'\]: RuntimeError: boom"):
        run_passes(gm, [split_rope_score, broken], REASSOC)


def test_pass_manager_keeps_the_error_type_of_a_user_facing_failure():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    with pytest.raises(NoMLAError, match=r"in pass find_mla_sites"):
        run_passes(gm, [find_mla_sites], REASSOC)


def test_pass_result_reports_modification():
    _, gm = zoo_model("reference")
    assert split_rope_score(gm).modified
    assert isinstance(split_rope_score(gm), PassResult) and not split_rope_score(gm).modified


@pytest.mark.skipif(not has_transformers(), reason="transformers not installed")
def test_lower_complex_removes_complex_rope_from_deepseek_v2():
    from mla_fx.passes.lower_complex import lower_complex

    model, gm = zoo_model("deepseek_v2")
    complex_ops = {aten.view_as_complex.default, aten.view_as_real.default, aten.polar.default}
    assert sum(n.target in complex_ops for n in gm.graph.nodes) > 0
    gm = _run(gm, [lower_complex])
    assert sum(n.target in complex_ops for n in gm.graph.nodes) == 0
    assert not any(getattr(n.meta.get("val"), "is_complex", lambda: False)() for n in gm.graph.nodes)
    _same_numbers(model, gm, tol=1e-6)  # float32 rounding: the original multiplies with fused ops
    gm = _run(gm, [split_rope_score, absorb_uk, absorb_uv, to_latent_attention, verify_latent_only])
    assert count(gm, LATENT) == LAYERS
    _same_numbers(model, gm, tol=1e-5)
