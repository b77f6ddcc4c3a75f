"""Adapters that give every model the calling convention the passes capture: input_ids -> logits."""

from __future__ import annotations

import torch
from torch import nn


class CausalLMLogits(nn.Module):
    """Wraps a HF causal LM so that forward(input_ids) returns logits [B, S, vocab] (no cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
