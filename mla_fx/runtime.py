"""A small generation runtime over the inference programs, for any back-end (PyTorch, ONNX Runtime).

Prompts of different lengths are batched with left padding: padding rows get attention_mask 0 and
position 0, real tokens positions 0..n-1, so every row computes exactly what it would alone. The
cache is the back-end's layout (mla_fx.products.CacheTensor: each layer's latent [batch, tokens, d_c + d_r],
a sparse layer's indexer keys), grown by each step's present arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mla_fx.errors import MLAFXError
from mla_fx.products import CacheTensor


class Backend(Protocol):
    cache: list[CacheTensor]
    vocab_size: int
    float_dtype: np.dtype

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray
                ) -> tuple[np.ndarray, list[np.ndarray]]: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]: ...


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MLAFXError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


@dataclass
class DecodeState:
    """The cache and bookkeeping of a batch being generated."""

    past: list[np.ndarray]
    attention_mask: np.ndarray  # [B, T] over every cached row
    next_position: np.ndarray  # [B]


class Session:
    """Prompt once, then advance token by token; each call returns that call's logits."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.state: DecodeState | None = None

    def start(self, prompts: Sequence[Sequence[int]], use_prefill: bool = True) -> np.ndarray:
        """Run the prompts; logits [B, S, V] (S = the longest prompt, left-padded)."""
        ids, mask = left_pad(prompts)
        if ids.max() >= self.backend.vocab_size or ids.min() < 0:
            raise MLAFXError(f"token ids must be in [0, {self.backend.vocab_size})")
        positions = positions_from_mask(mask)
        if use_prefill:
            logits, present = self.backend.prefill(ids, positions, mask)
        else:
            empty = [np.zeros((len(prompts), 0, c.width), dtype=self.backend.float_dtype) for c in self.backend.cache]
            logits, present = self.backend.step(ids, positions, mask, empty)
        self.state = DecodeState(present, mask, positions[:, -1] + 1)
        return logits

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one new token per row; logits [B, 1, V]."""
        if self.state is None:
            raise MLAFXError("start() the session with prompts first")
        s = self.state
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        mask = np.concatenate([s.attention_mask, np.ones_like(tokens)], axis=1)
        logits, present = self.backend.step(tokens, s.next_position[:, None], mask, s.past)
        self.state = DecodeState(present, mask, s.next_position + 1)
        return logits


def pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [B, V]: greedy at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def generate(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, use_prefill: bool = True,
             eos_id: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (a row stops at eos_id; the others go on)."""
    rng = np.random.default_rng(seed)
    session = Session(backend)
    logits = session.start(prompts, use_prefill)[:, -1]
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), dtype=bool)
    for i in range(max_new_tokens):
        tokens = pick(logits, temperature, top_k, rng)
        for row, tok in enumerate(tokens):
            if not done[row]:
                out[row].append(int(tok))
                done[row] = eos_id is not None and tok == eos_id
        if done.all() or i == max_new_tokens - 1:
            break
        logits = session.advance(tokens)[:, -1]
    return out
