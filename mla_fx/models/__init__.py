"""The model zoo: the reference MLA model, tiny HF transformers MLA models, the shipped trained model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mla_fx.models.reference import build_reference, tiny_config

YARN = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

REFERENCE_VARIANTS: dict[str, Callable[[], object]] = {
    "reference": lambda: tiny_config(),
    "reference_rotate_half": lambda: tiny_config(rope_layout="rotate_half"),
    "reference_no_q_lora": lambda: tiny_config(q_lora_rank=None),
    "reference_yarn": lambda: tiny_config(yarn=dict(YARN)),
}


def zoo_names() -> list[str]:
    from mla_fx.models.hf import ZOO_NAMES

    return [*REFERENCE_VARIANTS, *ZOO_NAMES]


def build_zoo(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny random model from the zoo (reference variants need no extra packages)."""
    if name in REFERENCE_VARIANTS:
        return build_reference(REFERENCE_VARIANTS[name](), seed=seed).to(dtype)
    from mla_fx.models import hf

    if name not in hf.ZOO_NAMES:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(zoo_names())}")
    return hf.build(name, seed=seed, dtype=dtype)
