"""Triton latent-attention decode kernel: MQA over the latent cache, one query token per batch row.

For each (block of heads, split of the cache, batch row) one program loads every cache tile once,
[c_KV (d_c) ; k_R (d_r)] as two power-of-two parts, and serves all heads of the block from it: the
FlashMLA insight that one latent row serves every head, so the cache is read once per head block
rather than once per head. Softmax is online, in float32, in the log2 domain. With several splits each
writes a normalized partial output and its log-sum-exp, and a second small kernel combines them.

Keys are valid when j < seq_lens[b] (variable cache lengths per row) and key_mask[b, j] != 0
(padding). Argument order is the TensorRT plugin's: input pointers, int32 scalars, output pointers.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def latent_attention_decode_kernel(
    q_latent_ptr, q_rope_ptr, kv_ptr, mask_ptr, seq_lens_ptr,
    stride_qb, stride_qh, stride_rb, stride_rh, stride_kvb, stride_kvt, stride_mb,
    n_heads, cache_len, tokens_per_split,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    out_ptr, lse_ptr,
    SCALE_LOG2E: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, P_C: tl.constexpr, P_R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # P_C, P_R: the parts' widths padded to what tl.dot takes (a power of two, at least 16); the padding
    # columns are masked off on load (zeros) and on store, and cost no memory traffic
    # head blocks vary fastest in launch order: the programs that read the same cache rows run together,
    # so the rows come from HBM once and from L2 for the other head blocks
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    live = heads < n_heads
    offs_c = tl.arange(0, P_C)
    offs_r = tl.arange(0, P_R)
    cols_c = offs_c < D_C  # all true where a part is not padded (the compiler folds it)
    cols_r = offs_r < D_R

    q_lat = tl.load(q_latent_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_c[None, :],
                    mask=live[:, None] & cols_c[None, :], other=0.0)
    q_rope = tl.load(q_rope_ptr + b * stride_rb + heads[:, None] * stride_rh + offs_r[None, :],
                     mask=live[:, None] & cols_r[None, :], other=0.0)
    if UPCAST:  # the interpreter computes low-precision dots wrongly; it runs in float32
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)

    length = cache_len
    if HAS_LENS:
        length = tl.minimum(tl.load(seq_lens_ptr + b), cache_len)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, P_C], tl.float32)
    row = kv_ptr + b * stride_kvb
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        c = tl.load(row + offs_n[:, None] * stride_kvt + offs_c[None, :], mask=valid[:, None] & cols_c[None, :],
                    other=0.0)
        r = tl.load(row + offs_n[:, None] * stride_kvt + D_C + offs_r[None, :],
                    mask=valid[:, None] & cols_r[None, :], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
            r = r.to(tl.float32)
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n, mask=valid, other=0)
            valid = valid & (keep != 0)
        s = tl.dot(q_lat, tl.trans(c), input_precision="ieee") + tl.dot(q_rope, tl.trans(r), input_precision="ieee")
        s = tl.where(valid[None, :], s * SCALE_LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no valid key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=live[:, None] & cols_c[None, :])
    if lse_ptr is not None:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=live)


def padded_width(d: int) -> int:
    """A part's width as the kernel computes it: a power of two, at least 16 (the least tl.dot takes)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def combine_splits_kernel(
    partial_ptr, lse_ptr, out_ptr,
    n_splits, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    D_C: tl.constexpr, SPLITS: tl.constexpr,
):
    """out[b, h] = sum_s w_s partial[b, h, s] with w_s = 2^(lse_s) / sum 2^(lse)."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_c = tl.arange(0, D_C)
    live = offs_s < n_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=live, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, axis=0)
    parts = tl.load(partial_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_c[None, :],
                    mask=live[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty))


def _splits(batch: int, head_blocks: int, cache_len: int, block_n: int) -> int:
    """Enough programs to fill a GPU (~2 per SM on an H100's 132) without tiles shorter than a block."""
    if INTERPRET:
        return min(4, max(1, triton.cdiv(cache_len, 4 * block_n)))
    target = 2 * 132
    return max(1, min(triton.cdiv(target, batch * head_blocks), triton.cdiv(cache_len, 4 * block_n), 64))


def latent_attention_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_kv: torch.Tensor, scale: float,
                            key_mask: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
                            num_splits: int | None = None, block_h: int = 16, block_n: int = 32,
                            num_warps: int = 4) -> torch.Tensor:
    """o~ [B, H, d_c] for one query token per row: q_latent [B, H, d_c], q_rope [B, H, d_r] (a [B, H, 1, d]
    view is accepted too), latent_kv [B, T, d_c + d_r] with unit stride on the last dim."""
    squeeze = q_latent.dim() == 4
    if squeeze:
        if q_latent.shape[2] != 1:
            raise ValueError("the decode kernel takes one query token per row")
        q_latent, q_rope = q_latent[:, :, 0], q_rope[:, :, 0]
    batch, heads, d_c = q_latent.shape
    d_r = q_rope.shape[-1]
    cache_len = latent_kv.shape[1]
    if latent_kv.shape[-1] != d_c + d_r or latent_kv.stride(-1) != 1:
        raise ValueError(f"latent_kv must be [B, T, {d_c + d_r}] with unit stride on the last dim")
    if d_c & (d_c - 1) or d_r & (d_r - 1):
        raise ValueError(f"d_c ({d_c}) and d_r ({d_r}) must be powers of two")
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    head_blocks = triton.cdiv(heads, block_h)
    splits = num_splits or _splits(batch, head_blocks, cache_len, block_n)
    per_split = triton.cdiv(max(cache_len, 1), splits)
    out = torch.empty_like(q_latent)
    if key_mask is not None:
        key_mask = key_mask.reshape(batch, -1)[:, :cache_len].contiguous().view(torch.int8) \
            if key_mask.dtype == torch.bool else key_mask.reshape(batch, -1).to(torch.int8).contiguous()
    if seq_lens is not None:
        seq_lens = seq_lens.to(torch.int32).contiguous()
    common = dict(SCALE_LOG2E=scale * LOG2E, D_C=d_c, D_R=d_r, P_C=padded_width(d_c), P_R=padded_width(d_r),
                  BLOCK_H=block_h, BLOCK_N=block_n,
                  HAS_MASK=key_mask is not None, HAS_LENS=seq_lens is not None,
                  UPCAST=INTERPRET or q_latent.dtype == torch.float32, num_warps=num_warps)
    args = (q_latent, q_rope, latent_kv, key_mask, seq_lens,
            q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
            latent_kv.stride(0), latent_kv.stride(1), key_mask.stride(0) if key_mask is not None else 0,
            heads, cache_len, per_split)
    if splits == 1:
        latent_attention_decode_kernel[(head_blocks, 1, batch)](
            *args, out.stride(0), out.stride(1), 0, 0, 0, out, None, **common)
        return out.unsqueeze(2) if squeeze else out
    partial = torch.empty(batch, heads, splits, d_c, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q_latent.device)
    latent_attention_decode_kernel[(head_blocks, splits, batch)](
        *args, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1), partial, lse,
        **common)
    combine_splits_kernel[(batch, heads)](
        partial, lse, out, splits, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0),
        lse.stride(1), out.stride(0), out.stride(1), D_C=d_c, SPLITS=triton.next_power_of_2(splits))
    return out.unsqueeze(2) if squeeze else out


def bytes_moved(batch: int, heads: int, cache_len: int, d_c: int, d_r: int, itemsize: int) -> int:
    """The floor of memory traffic: the cache once, queries and outputs once (for bandwidth figures)."""
    return itemsize * (batch * cache_len * (d_c + d_r) + batch * heads * (2 * d_c + d_r))


def flops(batch: int, heads: int, cache_len: int, d_c: int, d_r: int) -> int:
    return 2 * batch * heads * cache_len * (2 * d_c + d_r)


__all__ = ["latent_attention_decode", "bytes_moved", "flops"]
