"""The architecture sweep's cases (tests/test_architectures*.py): every architecture of the installed
transformers whose config has kv_lora_rank, built tiny as it really is (MoE on, one layer of each
kind), saved as a checkpoint directory and put through `mla-fx absorb` (checked against the HF model's logits and greedy
generation, in float64) and `mla-fx export --onnx` (float32: ONNX Runtime's prefill, decode steps and
greedy generation checked against the HF model). An architecture transformers adds is swept too, and
fails here with its name until mla-fx handles it or it is listed below with the reason.
"""

from __future__ import annotations

from pathlib import Path

from mla_fx import sweep
from mla_fx.models.architectures import mla_architectures

ARCHITECTURES = {a.name: a for a in mla_architectures()}
# What mla-fx cannot do yet, by architecture: (the stage it stops at, what it says there). Each is an
# open item of the architecture issue; the README's table (from `python -m mla_fx.sweep --markdown`)
# says the same.
HYBRID = ("export", "mixes MLA with linear_attention layers")  # the linear layers' state is not carried yet
SINKS = ("absorb", "no scaled_dot_product_attention at all")  # refuses SDPA (attention sinks): eager
KNOWN_GAPS = {
    "bailing_hybrid": HYBRID, "kimi_linear": HYBRID,
    "hy_v4": SINKS, "hy_v4_vl": SINKS,
    "glm5_next": ("absorb", "no decoupled RoPE part"),  # qk_rope_head_dim 0: the cache would be the latent alone
    "longcat_flash": ("absorb", "Eq(u0, 0)"),  # zero experts: a data-dependent expert loop
}
README = Path(__file__).parents[1] / "README.md"
NAMES = sorted(ARCHITECTURES)


def check(name: str, tmp_path: Path) -> None:
    """Sweep one architecture; it goes through, or stops where KNOWN_GAPS says; its README row is this."""
    row = sweep.sweep_one(ARCHITECTURES[name], tmp_path)
    if name in KNOWN_GAPS:
        stage, says = KNOWN_GAPS[name]
        assert not row.ok, f"{name} now goes through absorb and export: remove it from KNOWN_GAPS"
        assert (row.failed, says in row.message) == (stage, True), \
            f"{name} stops elsewhere than known: at {row.failed}: {row.message}"
    else:
        assert row.ok, f"{name} ({row.model_class}) stops at {row.failed}: {row.message}"
        assert row.passed == sweep.STAGES
    assert sweep.markdown_row(row) in README.read_text(), \
        f"the README's row for {name} is not what the sweep prints: python -m mla_fx.sweep --markdown"


