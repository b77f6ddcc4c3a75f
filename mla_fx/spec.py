"""MLASpec: the sizes and semantics of one MLA layer, from a HF config or from a matched graph."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

ROPE_LAYOUTS = ("rotate_half", "interleaved", "complex", "unknown")
ALWAYS_INTERLEAVED = {"longcat_flash"}  # no rope_interleave switch in their configs


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek-V3's YaRN attention-magnitude factor; 1 when there is no extension."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class MLASpec:
    n_heads: int
    q_lora_rank: int | None  # None: q comes from the hidden state through one projection
    kv_lora_rank: int  # d_c
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # d_r
    v_head_dim: int
    softmax_scale: float  # (d_nope + d_r)^-0.5 * mscale^2 with YaRN; never (d_c + d_r)^-0.5
    rope_layout: str = "unknown"
    hidden_size: int | None = None

    def __post_init__(self):
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def latent_dim(self) -> int:
        """Values per token per layer in the latent cache: [c_KV ; k_R]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def default_scale(self) -> float:
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5

    @property
    def q_input_dim(self) -> int | None:
        """Width of the tensor W_UQ reads: the q latent, or the hidden state without q compression."""
        return self.q_lora_rank or self.hidden_size

    def cache_values_per_token(self) -> dict[str, int]:
        """Per layer: expanded per-head K and V, HF transformers 5.x's cache, and the latent cache."""
        return {
            "expanded_kv": self.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim),
            "hf_transformers": self.kv_lora_rank + self.qk_rope_head_dim,  # latent, but re-expanded each step
            "latent": self.latent_dim,
        }

    def cache_bytes_per_token(self, bytes_per_value: int = 2) -> dict[str, int]:
        return {k: v * bytes_per_value for k, v in self.cache_values_per_token().items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> MLASpec:
        """Read a HF MLA config (DeepseekV2/V3, MiniCPM3, Glm4MoeLite, LongcatFlash, ...)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        missing = [k for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim") if get(k) is None]
        if missing:
            raise ValueError(f"config has no MLA fields {missing} (model_type={get('model_type')!r})")
        d_nope, d_rope = int(get("qk_nope_head_dim")), int(get("qk_rope_head_dim"))
        scale = (d_nope + d_rope) ** -0.5
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("mscale_all_dim"):
            scale *= yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"])) ** 2
        if get("model_type") == "deepseek_v2":
            layout = "complex"
        elif get("model_type") in ALWAYS_INTERLEAVED or get("rope_interleave", False):
            layout = "interleaved"
        else:
            layout = "rotate_half"
        return cls(
            n_heads=int(get("num_attention_heads")),
            q_lora_rank=get("q_lora_rank"),
            kv_lora_rank=int(get("kv_lora_rank")),
            qk_nope_head_dim=d_nope,
            qk_rope_head_dim=d_rope,
            v_head_dim=int(get("v_head_dim")),
            softmax_scale=scale,
            rope_layout=layout,
            hidden_size=get("hidden_size"),
        )
