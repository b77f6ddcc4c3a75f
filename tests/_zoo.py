from __future__ import annotations

import copy
import functools

import pytest
import torch

import mla_fx  # noqa: F401
from mla_fx.models import REFERENCE_VARIANTS, build_zoo
from mla_fx.passes.capture import capture
from mla_fx.precision import true_float64

HF_NAMES = ("deepseek_v3", "deepseek_v3_rotate_half", "deepseek_v3_yarn", "deepseek_v3_no_q_lora", "deepseek_v2",
            "minicpm3", "glm4_moe_lite", "longcat_flash")
ZOO = (*REFERENCE_VARIANTS, *HF_NAMES)
LATENT = torch.ops.mla_fx.latent_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def needs_hf(name: str):
    return [pytest.mark.skipif(not has_transformers(), reason="transformers not installed")] \
        if name in HF_NAMES else []


def has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


ZOO_PARAMS = [pytest.param(n, marks=needs_hf(n)) for n in ZOO]


@functools.cache
def _zoo(name: str, dtype: torch.dtype):
    model = build_zoo(name, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with true_float64(dtype):  # float64 models captured as float64 throughout (HF norms compute in float32)
        return model, capture(model, (ids,), max_seq=128)


def zoo_model(name: str, dtype: torch.dtype = torch.float32):
    """(eager model, a fresh copy of its captured graph); captures are cached per session."""
    model, gm = _zoo(name, dtype)
    return model, copy.deepcopy(gm)


def count(gm, target) -> int:
    return sum(n.target is target for n in gm.graph.nodes)


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def ids_for(model, batch: int = 2, seq: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
