"""Ahead-of-time compile of the decode kernel to PTX (no GPU needed), for the TensorRT plugin.

The plugin's engine then runs without Python. This is the single-pass variant (one split: the
program writes the final output), reading the bool mask as int8; argument order is TensorRT's:
input pointers, int32 scalars, output pointers.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from .latent_attention import LOG2E, latent_attention_decode_kernel

DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
SHARED_LIMIT = 48 * 1024  # TensorRT plugins launch without opting into more shared memory


@dataclass(frozen=True)
class AotKernel:
    name: str
    ptx: str
    shared_bytes: int
    num_warps: int
    block_h: int


def decode_scalar_args(batch, heads, cache_len, kv_lora_rank: int, rope_dim: int) -> list:
    """int32 scalars in kernel order for contiguous q_latent [B,H,1,d_c], q_rope [B,H,1,d_r],
    latent_kv [B,T,d_c+d_r], mask [B,1,1,T], out [B,H,1,d_c]. Only + and *: works with ints and with
    TensorRT's symbolic shape expressions alike."""
    width = kv_lora_rank + rope_dim
    return [
        heads * kv_lora_rank, kv_lora_rank,  # stride_qb, stride_qh
        heads * rope_dim, rope_dim,  # stride_rb, stride_rh
        cache_len * width, width,  # stride_kvb, stride_kvt
        cache_len,  # stride_mb
        heads, cache_len, cache_len,  # n_heads, cache_len, tokens_per_split (one split)
        heads * kv_lora_rank, kv_lora_rank,  # stride_ob, stride_oh
    ]


def decode_grid(batch, heads, block_h: int):
    return batch, (heads + block_h - 1) // block_h, 1


def main() -> None:
    """python -m mla_fx.kernels.aot DTYPE D_C D_R SCALE: print the compiled kernel as JSON."""
    import json
    import sys

    dtype, d_c, d_r, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    kernel = compile_decode_ptx(dtype, d_c, d_r, scale)
    print(json.dumps(kernel.__dict__))


def compile_decode_ptx(dtype: str, kv_lora_rank: int, rope_dim: int, scale: float, arch: int = 90,
                       block_h: int = 16, block_n: int = 16, num_warps: int = 4, num_stages: int = 2) -> AotKernel:
    """PTX of the single-pass kernel; block_n 16 with 2 stages keeps shared memory at 38 KB for d_c 512, d_r 64.

    Run it in a process without TRITON_INTERPRET=1: the interpreter patches triton.language globally.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    ptr = DTYPES[dtype]
    fn = JITFunction(latent_attention_decode_kernel.fn)  # a real JIT function even under TRITON_INTERPRET
    signature = {
        "q_latent_ptr": ptr, "q_rope_ptr": ptr, "kv_ptr": ptr, "mask_ptr": "*i8", "seq_lens_ptr": "constexpr",
        **{name: "i32" for name in ("stride_qb", "stride_qh", "stride_rb", "stride_rh", "stride_kvb", "stride_kvt",
                                    "stride_mb", "n_heads", "cache_len", "tokens_per_split")},
        "stride_ob": "i32", "stride_oh": "i32", "stride_os": "constexpr", "stride_lb": "constexpr",
        "stride_lh": "constexpr", "out_ptr": ptr, "lse_ptr": "constexpr",
        **{name: "constexpr" for name in ("SCALE_LOG2E", "D_C", "D_R", "BLOCK_H", "BLOCK_N", "HAS_MASK",
                                         "HAS_LENS", "UPCAST")},
    }
    constexprs = {"seq_lens_ptr": None, "lse_ptr": None, "stride_os": 0, "stride_lb": 0, "stride_lh": 0,
                  "SCALE_LOG2E": float(scale) * LOG2E, "D_C": kv_lora_rank, "D_R": rope_dim, "BLOCK_H": block_h,
                  "BLOCK_N": block_n, "HAS_MASK": True, "HAS_LENS": False, "UPCAST": dtype == "fp32"}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    meta = compiled.metadata
    scratch = getattr(meta, "global_scratch_size", 0), getattr(meta, "profile_scratch_size", 0)
    if any(scratch):
        raise RuntimeError(f"the kernel needs global/profile scratch {scratch}; the plugin cannot provide it")
    if meta.shared > SHARED_LIMIT:
        raise RuntimeError(f"the kernel needs {meta.shared} bytes of shared memory (limit {SHARED_LIMIT})")
    return AotKernel(meta.name, compiled.asm["ptx"], meta.shared, meta.num_warps, block_h)


if __name__ == "__main__":
    main()
