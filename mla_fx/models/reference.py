"""Reference Multi-head Latent Attention decoder LM, written from the DeepSeek-V2 paper's equations.

Per layer, token t, head i (the equations of the DeepSeek-V2 paper, appendix C)::

    c_Q   = q_norm(W_DQ h_t)                         (or q_C comes from W_Q h_t when q_lora_rank is None)
    q_C,i = W_UQ,i c_Q          q_R,i = RoPE(W_QR,i c_Q)
    c_KV  = kv_norm(W_DKV h_t)  k_R   = RoPE(W_KR h_t)        (k_R shared by all heads)
    k_C,i = W_UK,i c_KV         v_i   = W_UV,i c_KV
    o_i   = softmax([q_C,i; q_R,i] . [k_C,i; k_R] * scale) v ;   u_t = W_O [o_1; ...; o_H]

scale = (d_nope + d_r)^-0.5 * mscale^2 with DeepSeek-V3 YaRN semantics. Each matrix of the paper
is its own bias-free nn.Linear, so the rewrite passes see exactly the paper's dataflow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "mla_fx_reference"
ROPE_LAYOUTS = ("rotate_half", "interleaved")
YARN_KEYS = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0}


@dataclass
class MLAConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_layout: str = "interleaved"
    yarn: dict | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6

    model_type = MODEL_TYPE  # class attribute, not a field

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        ints = ["vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "intermediate_size", "max_position_embeddings"]
        for name in ints + ["q_lora_rank"]:
            v = getattr(self, name)
            if name == "q_lora_rank" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MLAConfig.{name} must be a positive int, got {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"MLAConfig.{name} must be a positive number, got {v!r}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"MLAConfig.rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.yarn is not None:
            if not isinstance(self.yarn, dict):
                raise ValueError(f"MLAConfig.yarn must be a dict or None, got {type(self.yarn).__name__}")
            unknown = set(self.yarn) - YARN_KEYS
            if unknown:
                raise ValueError(f"MLAConfig.yarn has unknown keys {sorted(unknown)}; allowed: {sorted(YARN_KEYS)}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.yarn:
                    raise ValueError(f"MLAConfig.yarn needs '{key}'")
            for key, v in self.yarn.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ValueError(f"MLAConfig.yarn['{key}'] must be a non-negative number, got {v!r}")
            if self.yarn["factor"] <= 0 or self.yarn["original_max_position_embeddings"] <= 0:
                raise ValueError("MLAConfig.yarn 'factor' and 'original_max_position_embeddings' must be > 0")

    def yarn_param(self, key: str) -> float:
        assert self.yarn is not None
        return self.yarn.get(key, YARN_DEFAULTS.get(key))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """(d_nope + d_r)^-0.5 * mscale^2, mscale from YaRN's mscale_all_dim (DeepSeek-V3)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None:
            mscale_all_dim = self.yarn_param("mscale_all_dim")
            if mscale_all_dim:
                m = yarn_get_mscale(self.yarn_param("factor"), mscale_all_dim)
                scale = scale * m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = MODEL_TYPE
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLAConfig:
        if not isinstance(d, dict):
            raise ValueError(f"MLAConfig.from_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        mt = d.pop("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ValueError(f"model_type is {mt!r}, expected {MODEL_TYPE!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"MLAConfig: unknown fields {sorted(unknown)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(d)
        if missing:
            raise ValueError(f"MLAConfig: missing fields {sorted(missing)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------- RoPE


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_find_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_find_correction_range(low_rot: float, high_rot: float, dim: int, base: float, max_pos: int):
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_pos))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_pos))
    return max(low, 0), min(high, dim - 1)


def yarn_linear_ramp_mask(lo: float, hi: float, dim: int) -> torch.Tensor:
    if lo == hi:
        hi += 0.001
    return torch.clamp((torch.arange(dim, dtype=torch.float64) - lo) / (hi - lo), 0, 1)


def rope_inv_freq(config: MLAConfig) -> tuple[torch.Tensor, float]:
    """inv_freq [d_r/2] (float64) and the cos/sin multiplier (YaRN mscale/mscale_all_dim ratio)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq_extra = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.yarn is None or config.yarn_param("factor") <= 1:
        return freq_extra, 1.0
    factor = config.yarn_param("factor")
    freq_inter = freq_extra / factor
    low, high = yarn_find_correction_range(config.yarn_param("beta_fast"), config.yarn_param("beta_slow"), dim,
                                           base, config.yarn_param("original_max_position_embeddings"))
    extra_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2)
    inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
    attn_mscale = yarn_get_mscale(factor, config.yarn_param("mscale")) / yarn_get_mscale(
        factor, config.yarn_param("mscale_all_dim"))
    return inv_freq, float(attn_mscale)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, h, S, d_r]; cos/sin [B, 1, S, d_r/2] (already scaled by the YaRN mscale ratio)."""
    if layout == "interleaved":  # pairs (x0, x1), (x2, x3), ... rotated by angle t * inv_freq[j]
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    x0, x1 = x.chunk(2, dim=-1)  # rotate_half: pairs (x_j, x_{j + d/2})
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


# ------------------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


class MLAAttention(nn.Module):
    def __init__(self, c: MLAConfig):
        super().__init__()
        self.config = c
        H, dn, dr, dv = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        if c.q_lora_rank is not None:
            self.w_dq = _linear(c.hidden_size, c.q_lora_rank)
            self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.w_uq = _linear(c.q_lora_rank, H * dn)
            self.w_qr = _linear(c.q_lora_rank, H * dr)
        else:
            self.w_q = _linear(c.hidden_size, H * dn)
            self.w_qr = _linear(c.hidden_size, H * dr)
        self.w_dkv = _linear(c.hidden_size, c.kv_lora_rank)
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.w_kr = _linear(c.hidden_size, dr)
        self.w_uk = _linear(c.kv_lora_rank, H * dn)
        self.w_uv = _linear(c.kv_lora_rank, H * dv)
        self.w_o = _linear(H * dv, c.hidden_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, S, _ = h.shape
        H, layout = c.num_heads, c.rope_layout

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # [B, S, n*d] -> [B, n, S, d]
            return x.view(B, S, n, -1).transpose(1, 2)

        if c.q_lora_rank is not None:
            c_q = self.q_norm(self.w_dq(h))
            q_nope, q_rope = self.w_uq(c_q), self.w_qr(c_q)
        else:
            q_nope, q_rope = self.w_q(h), self.w_qr(h)
        q_nope = heads(q_nope, H)
        q_rope = apply_rope(heads(q_rope, H), cos, sin, layout)

        c_kv = self.kv_norm(self.w_dkv(h))                                  # the latent (cached) [B, S, d_c]
        k_rope = apply_rope(heads(self.w_kr(h), 1), cos, sin, layout)      # [B, 1, S, d_r]
        k_nope = heads(self.w_uk(c_kv), H)
        v = heads(self.w_uv(c_kv), H)

        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.softmax_scale)
        return self.w_o(o.transpose(1, 2).reshape(B, S, H * c.v_head_dim))


class SwiGLU(nn.Module):
    def __init__(self, c: MLAConfig):
        super().__init__()
        self.w_gate = _linear(c.hidden_size, c.intermediate_size)
        self.w_up = _linear(c.hidden_size, c.intermediate_size)
        self.w_down = _linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MLADecoderLayer(nn.Module):
    def __init__(self, c: MLAConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = MLAAttention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class MLAForCausalLM(nn.Module):
    def __init__(self, config: MLAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MLADecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = _linear(config.hidden_size, config.vocab_size)
        # inv_freq is a float64 constant, not a buffer, so model.to(bfloat16) cannot round it.
        self.inv_freq, self.rope_mscale = rope_inv_freq(config)

    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin [B, 1, S, d_r/2] for positions [B, S], computed in float32 (float64 for float64 models)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        t = position_ids.to(work)[:, None, :, None]
        freqs = t * self.inv_freq.to(device=position_ids.device, dtype=work)
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_mscale != 1.0:
            cos, sin = cos * self.rope_mscale, sin * self.rope_mscale
        return cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, S, V]; positions default to 0..S-1 (no cache: the model itself never caches)."""
        x = self.embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = self.rope_cos_sin(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------- builders


def tiny_config(**overrides: Any) -> MLAConfig:
    """Small sizes for tests; every dimension distinct so shape bugs show up."""
    d = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, q_lora_rank=48, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96,
             rope_layout="interleaved", max_position_embeddings=256)
    d.update(overrides)
    return MLAConfig(**d)


def build_reference(config: MLAConfig, seed: int = 0, std: float = 0.15) -> MLAForCausalLM:
    """Random weights large enough that attention is far from uniform (float32, eval mode)."""
    model = MLAForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name == "embed.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()
