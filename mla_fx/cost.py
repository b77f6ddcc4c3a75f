"""Cost model: what each absorption mode costs per decoded token, and which to pick.

Decode is memory-bound, so the deciding figure is the weight bytes read per token; FLOPs are
reported beside it. Only the weights absorption changes are counted (q up-projection, W_UK, W_UV,
W_O); everything else, the attention over the cache included, is the same in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mla_fx.spec import MLASpec

MODES = ("reassociate", "fold")


@dataclass(frozen=True)
class ModeCost:
    params: int  # weights read per decoded token by the absorbed projections
    flops_per_token: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def mode_costs(spec: MLASpec) -> dict[str, ModeCost]:
    if spec.hidden_size is None or spec.q_input_dim is None:
        raise ValueError("the cost model needs hidden_size in the MLASpec")
    h, dn, dv, dc = spec.n_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    dq, d = spec.q_input_dim, spec.hidden_size
    reassociate = h * dn * dq + h * dn * dc + h * dv * dc + d * h * dv  # W_UQ, W_UK, W_UV, W_O
    fold = h * dc * dq + d * h * dc  # W_UK^T W_UQ, W_O W_UV
    return {"reassociate": ModeCost(reassociate, 2 * reassociate), "fold": ModeCost(fold, 2 * fold)}


def attention_flops_per_token(spec: MLASpec, cache_len: int) -> int:
    """Absorbed MQA over `cache_len` latent rows: scores over d_c + d_r, output over d_c."""
    return 2 * spec.n_heads * cache_len * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim)


def choose_mode(specs: Sequence[MLASpec]) -> str:
    """The mode that reads fewer weight bytes per decoded token over the whole model."""
    totals = {m: sum(mode_costs(s)[m].params for s in specs) for m in MODES}
    return min(MODES, key=lambda m: (totals[m], MODES.index(m)))


def prefill_flops(spec: MLASpec, new_tokens: int, cached_tokens: int) -> dict[str, int]:
    """FLOPs of one MLA attention for `new_tokens` queries over `cached_tokens + new_tokens` keys.

    un-absorbed: expand K/V of every key from the latent (W_UK, W_UV), attention with head dims
    d_nope + d_r and d_v. absorbed: W_UK/W_UV per query, MQA with head dim d_c + d_r and d_c.
    """
    h, dn, dr, dv, dc = (spec.n_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim,
                         spec.kv_lora_rank)
    s, t = new_tokens, cached_tokens + new_tokens
    return {
        "unabsorbed": 2 * t * dc * h * (dn + dv) + 2 * h * s * t * (dn + dr + dv),
        "absorbed": 2 * s * h * dc * (dn + dv) + 2 * h * s * t * (2 * dc + dr),
    }


def crossover_tokens(spec: MLASpec) -> float:
    """New tokens sharing a long cached prefix above which un-absorbed attention costs fewer FLOPs.

    As cached_tokens -> inf the costs per cached token are 2 d_c H (d_nope + d_v) + 2 H S (d_nope + d_r + d_v)
    and 2 H S (2 d_c + d_r): they cross at S = d_c (d_nope + d_v) / (2 d_c + d_r - (d_nope + d_r + d_v)).
    DeepSeek-V3: 512 * 256 / 768 = 170.7. Infinite when absorbed attention is never the more expensive.
    """
    dn, dr, dv, dc = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    extra = 2 * dc + dr - (dn + dr + dv)
    return dc * (dn + dv) / extra if extra > 0 else float("inf")


def use_prefill_program(spec: MLASpec, prompt_tokens: int) -> bool:
    """A prompt with no cached prefix: run it un-absorbed when that costs fewer FLOPs."""
    costs = prefill_flops(spec, prompt_tokens, 0)
    return costs["unabsorbed"] <= costs["absorbed"]
