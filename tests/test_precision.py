"""Float64 checks are float64 throughout: HF models compute norms, RoPE and routers in float32, which made
float64 comparisons print exactly 0 (or a float32-sized jump) instead of measuring the rewrite."""

from __future__ import annotations

import pytest
import torch

from mla_fx.absorb import AbsorbConfig
from mla_fx.api import absorb_and_check
from mla_fx.loading import load_model
from mla_fx.precision import true_float64

from _zoo import has_transformers, ids_for, rel_l2

pytestmark = pytest.mark.skipif(not has_transformers(), reason="transformers not installed")


@pytest.fixture(scope="module")
def deepseek_v3():
    return load_model("zoo:deepseek_v3")


def test_hf_float64_is_not_float64_without_it(deepseek_v3):
    model = deepseek_v3.to(torch.float64).module
    ids = ids_for(model)
    with torch.no_grad():
        plain = model(ids)
        with true_float64(torch.float64):
            full = model(ids)
            again = model(ids)
    assert full.dtype == plain.dtype == torch.float64
    assert torch.equal(full, again)
    # HF's RMSNorm rounds to float32 inside a float64 model: float32-sized differences, not float64 ones
    assert 1e-9 < rel_l2(full, plain) < 1e-5


def test_true_float64_leaves_other_dtypes_alone(deepseek_v3):
    model = deepseek_v3.module
    ids = ids_for(model)
    with torch.no_grad():
        plain = model(ids)
        with true_float64(torch.float32):
            same = model(ids)
    assert torch.equal(plain, same)


def test_float64_check_measures_the_rewrite(deepseek_v3):
    """The issue's symptom was `max_abs=0 rel_l2=0` in float64: now the reassociation's rounding shows."""
    run = absorb_and_check(deepseek_v3, AbsorbConfig(mode="reassociate"), torch.float64)
    assert run.passed
    for c in run.comparisons:
        assert 0 < c.rel_l2 < 1e-13, c.line()


def test_low_precision_is_judged_against_float64():
    """bf16/fp16: the rewrite may add at most 1.5x the original's own error (vs float64), plus a floor."""
    from mla_fx.check import ERROR_FLOOR, ERROR_GROWTH, compare_to_float64

    g = torch.Generator().manual_seed(0)
    exact = torch.randn(2, 7, 50, generator=g, dtype=torch.float64)
    noise = torch.randn(exact.shape, generator=g, dtype=torch.float64)
    original = exact + 0.05 * noise  # the original's own error in the dtype: 5%
    same_error = exact + 0.05 * torch.randn(exact.shape, generator=g, dtype=torch.float64)
    worse = exact + 0.05 * (ERROR_GROWTH + 0.2) * noise
    ok = compare_to_float64("logits[bfloat16 x]", exact, original, same_error)
    bad = compare_to_float64("logits[bfloat16 x]", exact, original, worse)
    assert ok.passed and not bad.passed
    assert ok.tol == pytest.approx(ERROR_GROWTH * 0.05 + ERROR_FLOOR, rel=0.05)
    assert "error vs float64 original: rewritten" in ok.line() and "original 0.05" in ok.line()
    # an original that is exact in its dtype leaves the floor
    assert not compare_to_float64("x", exact, exact, exact + 2 * ERROR_FLOOR * noise).passed


def test_bfloat16_check_uses_the_float64_original(deepseek_v3):
    run = absorb_and_check(deepseek_v3, AbsorbConfig(), torch.bfloat16)
    assert run.passed and run.comparisons
    assert all("error vs float64 original" in c.line() for c in run.comparisons)
