"""The attention ops the passes rewrite into.

`mla_fx::split_rope_attention` is the un-absorbed MLA attention with the decoupled-RoPE score term
kept apart: score = q_nope.k_nope + q_rope.k_rope. Heads broadcast, so k_nope/v may have one head
(the latent, after absorption) or H heads (expanded). It is the intermediate form between passes.

`mla_fx::latent_attention` is the final form: MQA over the latent cache row [c_KV ; k_R]
(d_c + d_r values per token, one head shared by all query heads); the output stays in latent space
(d_c per head) and W_UV is applied after it.

Both are reference math on any device (softmax in float32), with fake implementations so that
torch.export can trace them with symbolic shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _softmax(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(scores + mask) over the last dim; fully masked rows (padding) give zeros, not NaN."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if is_causal:  # bottom-right aligned: query i of S sees keys up to T - S + i (the decode convention)
        s, t = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(diagonal=t - s)
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def _attend(scores: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(scores + mask) @ v, accumulated in float32 (float64 stays float64)."""
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return torch.matmul(_softmax(scores.to(acc), attn_mask, is_causal), v.to(acc))


@torch.library.custom_op("mla_fx::split_rope_attention", mutates_args=())
def split_rope_attention(
    q_nope: Tensor,
    q_rope: Tensor,
    k_nope: Tensor,
    k_rope: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    is_causal: bool,
) -> Tensor:
    """softmax((q_nope.k_nope + q_rope.k_rope) * scale) v. Shapes [B,H|1,S|T,D]."""
    scores = torch.matmul(q_nope, k_nope.transpose(-1, -2)) + torch.matmul(q_rope, k_rope.transpose(-1, -2))
    return _attend(scores * scale, v, attn_mask, is_causal).to(q_nope.dtype).contiguous()


@split_rope_attention.register_fake
def _(q_nope, q_rope, k_nope, k_rope, v, attn_mask, scale, is_causal):
    b, h, s, _ = q_nope.shape
    return q_nope.new_empty((b, h, s, v.shape[-1]))


def latent_attention_reference(q_latent: Tensor, q_rope: Tensor, latent_kv: Tensor, attn_mask: Tensor | None,
                               scale: float, is_causal: bool) -> Tensor:
    """MQA over the latent cache.

    q_latent [B,H,S,d_c] (W_UK already applied), q_rope [B,H,S,d_r] (after RoPE),
    latent_kv [B,T,d_c+d_r] = [c_KV ; k_R] per token. Returns o~ [B,H,S,d_c].

    Heads are folded into rows ([B, H*S, d_c+d_r] @ [B, d_c+d_r, T]): every head reads the one latent row,
    and the cache is never copied per head (a broadcast matmul would copy it H times).
    """
    b, h, s, d_c = q_latent.shape
    acc = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    q = torch.cat([q_latent, q_rope], dim=-1).reshape(b, h * s, -1)
    scores = torch.bmm(q, latent_kv.transpose(1, 2)).view(b, h, s, -1).to(acc) * scale
    probs = _softmax(scores, attn_mask, is_causal)
    out = torch.bmm(probs.view(b, h * s, -1), latent_kv[..., :d_c].to(acc))
    return out.view(b, h, s, d_c).to(q_latent.dtype)


@torch.library.custom_op("mla_fx::latent_attention", mutates_args=())
def latent_attention(
    q_latent: Tensor,
    q_rope: Tensor,
    latent_kv: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    is_causal: bool,
) -> Tensor:
    """MQA over the latent cache; reference math here, the Triton decode kernel on CUDA."""
    return latent_attention_reference(q_latent, q_rope, latent_kv, attn_mask, scale, is_causal)


@latent_attention.register_fake
def _(q_latent, q_rope, latent_kv, attn_mask, scale, is_causal):
    return torch.empty_like(q_latent)


def kernel_eligible(q_latent: Tensor, q_rope: Tensor, attn_mask: Tensor | None) -> bool:
    """The Triton kernel serves decode: one query token, a key-only mask, power-of-two parts."""
    d_c, d_r = q_latent.shape[-1], q_rope.shape[-1]
    key_mask_only = attn_mask is None or (attn_mask.dim() == 4 and attn_mask.shape[-2] == 1
                                          and attn_mask.dtype == torch.bool)
    return (q_latent.shape[2] == 1 and key_mask_only and q_latent.dtype in (torch.float16, torch.bfloat16,
                                                                                torch.float32)
            and d_c & (d_c - 1) == 0 and d_r & (d_r - 1) == 0)


def latent_attention_with_kernel(q_latent: Tensor, q_rope: Tensor, latent_kv: Tensor, attn_mask: Tensor | None,
                                 scale: float, is_causal: bool) -> Tensor:
    """The op's CUDA implementation: the Triton decode kernel where it applies, reference math elsewhere."""
    if not kernel_eligible(q_latent, q_rope, attn_mask):
        return latent_attention_reference(q_latent, q_rope, latent_kv, attn_mask, scale, is_causal)
    from mla_fx.kernels.latent_attention import latent_attention_decode

    kv = latent_kv if latent_kv.stride(-1) == 1 else latent_kv.contiguous()
    key_mask = attn_mask.expand(-1, 1, 1, -1) if attn_mask is not None else None
    return latent_attention_decode(q_latent, q_rope, kv, scale, key_mask=key_mask)


@latent_attention.register_kernel("cuda")
def _(q_latent, q_rope, latent_kv, attn_mask, scale, is_causal):
    return latent_attention_with_kernel(q_latent, q_rope, latent_kv, attn_mask, scale, is_causal)


def sparse_latent_attention_reference(q_latent: Tensor, q_rope: Tensor, latent_kv: Tensor, indices: Tensor,
                                      valid: Tensor, scale: float) -> Tensor:
    """MQA over the latent rows a top-k selected (DeepSeek Sparse Attention).

    indices [B,S,K] are rows of latent_kv [B,T,d_c+d_r] per query token, valid [B,S,K] (bool) says which of
    them take part (a top-k over fewer than K attendable rows pads with rows that do not). Each query reads
    its K rows once for all heads: rows [B,S,K,D], scores [B,S,H,K]. Returns o~ [B,H,S,d_c].
    """
    b, h, s, d_c = q_latent.shape
    acc = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    rows = latent_kv[torch.arange(b, device=latent_kv.device)[:, None, None], indices].to(acc)  # [B,S,K,D]
    q = torch.cat([q_latent, q_rope], dim=-1).transpose(1, 2).to(acc)  # [B,S,H,D]
    scores = torch.matmul(q, rows.transpose(-1, -2)) * scale  # [B,S,H,K]
    probs = _softmax(scores, valid[:, :, None, :], False)
    out = torch.matmul(probs, rows[..., :d_c])  # [B,S,H,d_c]
    return out.transpose(1, 2).to(q_latent.dtype).contiguous()


@torch.library.custom_op("mla_fx::sparse_latent_attention", mutates_args=())
def sparse_latent_attention(q_latent: Tensor, q_rope: Tensor, latent_kv: Tensor, indices: Tensor, valid: Tensor,
                            scale: float) -> Tensor:
    """MQA over the latent rows a top-k selected; reference math on every device."""
    return sparse_latent_attention_reference(q_latent, q_rope, latent_kv, indices, valid, scale)


@sparse_latent_attention.register_fake
def _(q_latent, q_rope, latent_kv, indices, valid, scale):
    return torch.empty_like(q_latent)
