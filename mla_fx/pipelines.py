"""Every pass pipeline mla-fx runs, named in one place (each pass is a file in passes/).

    capture  -> CANONICAL                      the forms the passes match (passes/capture.py)
    absorb   -> ABSORB                         the full-sequence program over the latent (mla-fx absorb)
    programs -> PREFILL on a copy of the capture, ABSORB then STEP on the capture (mla_fx/inference.py)
    export   -> onnx_lowering(attention)       before torch.onnx (export/onnx.py)

Each runs through :func:`mla_fx.passes.manager.run_passes` with a :class:`mla_fx.passes.context.PassContext`.
"""

from __future__ import annotations

from mla_fx.passes.absorb_uk import absorb_uk
from mla_fx.passes.absorb_uv import absorb_uv
from mla_fx.passes.add_index_cache import add_index_cache
from mla_fx.passes.add_latent_cache import add_latent_cache
from mla_fx.passes.add_prefill_cache import add_prefill_cache
from mla_fx.passes.cleanup import cleanup
from mla_fx.passes.distribute_query_scale import distribute_query_scale
from mla_fx.passes.find_mla_sites import find_mla_sites
from mla_fx.passes.lower_complex import lower_complex
from mla_fx.passes.split_query_like_key import split_query_like_key
from mla_fx.passes.split_rope_score import split_rope_score
from mla_fx.passes.to_latent_attention import to_latent_attention
from mla_fx.passes.verify_latent_only import verify_latent_only

CANONICAL = [distribute_query_scale, split_query_like_key]
ABSORB = [find_mla_sites, split_rope_score, absorb_uk, absorb_uv, to_latent_attention, verify_latent_only, cleanup]
STEP = [add_latent_cache, add_index_cache]
PREFILL = [add_prefill_cache]


def onnx_lowering(attention: str) -> list:
    """Complex RoPE to real arithmetic, the latent attention to the ONNX node `attention` names."""
    from mla_fx.export.lower_latent_attention import lower_latent_attention

    return [lower_complex, lower_latent_attention(attention)]
