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
