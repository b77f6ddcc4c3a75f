"""The generation runtime: padding, positions, sampling; and the prefill cost model."""

from __future__ import annotations

import numpy as np
import pytest

from mla_fx.cost import crossover_tokens, prefill_flops, use_prefill_program
from mla_fx.errors import MLAFXError
from mla_fx.runtime import left_pad, pick, positions_from_mask
from mla_fx.spec import MLASpec

V3 = MLASpec(n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
             v_head_dim=128, softmax_scale=0.1, hidden_size=7168)


def test_left_padding_and_positions():
    ids, mask = left_pad([[7, 8, 9], [5]])
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(MLAFXError, match="at least one token"):
        left_pad([[1], []])


def test_pick_is_greedy_at_zero_temperature_and_seeded_otherwise():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert pick(logits, 0.0, 0, np.random.default_rng(0)).tolist() == [1, 0]
    a = [pick(logits, 1.0, 0, np.random.default_rng(5)).tolist() for _ in range(2)]
    assert a[0] == a[1]
    # top-k 1 is greedy whatever the temperature
    assert pick(logits, 5.0, 1, np.random.default_rng(1)).tolist() == [1, 0]


def test_prefix_crossover_is_170_tokens_at_deepseek_v3_sizes():
    assert crossover_tokens(V3) == pytest.approx(512 * 256 / 768)
    long_prefix = 1_000_000
    below, above = prefill_flops(V3, 160, long_prefix), prefill_flops(V3, 180, long_prefix)
    assert below["absorbed"] < below["unabsorbed"] and above["unabsorbed"] < above["absorbed"]


def test_prompts_without_a_prefix_run_un_absorbed_at_deepseek_sizes():
    assert use_prefill_program(V3, 1) and use_prefill_program(V3, 4096)
    costs = prefill_flops(V3, 16, 0)
    assert costs["unabsorbed"] == 2 * 16 * 512 * 128 * 256 + 2 * 128 * 16 * 16 * 320
