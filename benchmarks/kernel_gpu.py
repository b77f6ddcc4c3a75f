"""The Triton decode kernel on a GPU: achieved bandwidth against the copy bandwidth, torch SDPA beside it.

    python -m benchmarks.kernel_gpu [--quick] [--out DIR]

Needs a CUDA GPU and triton (elsewhere it says so and exits 2); needs nothing else of mla-fx's
dependencies, so it runs from a source checkout with only torch and triton installed.

For each case (128 heads; batch 64 and 128; cache 4,096 and 8,192 tokens; bf16): fresh random inputs,
a left-padded row, the kernel checked against the reference op in float32 (rel L2 <= 2e-2), then timed
(median of CUDA-event timings, triton.testing.do_bench). bytes = the floor of memory traffic (cache
once, queries and outputs once); achieved bandwidth = bytes / time, against the machine's copy
bandwidth (a 1 GiB device-to-device copy, bytes read + written). The aim is > 80% (FlashMLA reaches
about 90% on H800). torch's scaled_dot_product_attention runs on the same absorbed inputs, as one
MQA head over [c_KV ; k_R] with every query head folded into the query rows. The cache of a case
(>= 300 MB) is far larger than L2, so timings over one buffer do not measure the cache.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import DEFAULT_OUT, table, write_csv

D_C, D_R, HEADS = 512, 64, 128
SCALE = (128 + 64) ** -0.5  # DeepSeek-V3: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)
AIM = 0.80
# (block_h, block_n, num_warps): the wrapper's default first; the others take more heads per program
# (fewer reads of a row from L2). All compile for sm_90 without register spills, single-pass and split
# (ptxas, 3 stages, bf16): 182/180, 190/177, 174/150 and 255/238 registers
CONFIGS = ((16, 32, 4), (32, 32, 8), (32, 16, 8), (32, 16, 4))
COLUMNS = ("batch", "cache_tokens", "heads", "dtype", "config", "kernel_ms", "kernel_gbs", "of_copy",
           "sdpa_ms", "sdpa_over_kernel", "kernel_rel_err", "sdpa_rel_err")


def grid(quick: bool) -> list[tuple[int, int]]:
    return [(64, 4096)] if quick else [(64, 4096), (64, 8192), (128, 4096), (128, 8192)]


def cuda_timer(fn: Callable[[], object]) -> float:
    """Median seconds of `fn` on the GPU (CUDA events, warm-up excluded)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def copy_bandwidth(timer: Callable[[Callable[[], object]], float], device: str, nbytes: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def inputs(batch: int, cache_len: int, heads: int, dtype: torch.dtype, device: str, seed: int):
    """q_latent, q_rope [B, H, 1, d], latent_kv [B, T, d_c + d_r], key mask [B, 1, 1, T] (row 0 left-padded)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q_latent = torch.randn(batch, heads, 1, D_C, generator=g, device=device).to(dtype)
    q_rope = torch.randn(batch, heads, 1, D_R, generator=g, device=device).to(dtype)
    latent_kv = torch.randn(batch, cache_len, D_C + D_R, generator=g, device=device).to(dtype)
    mask = torch.ones(batch, 1, 1, cache_len, dtype=torch.bool, device=device)
    mask[0, ..., : cache_len // 3] = False
    return q_latent, q_rope, latent_kv, mask


def sdpa_mqa(q_latent, q_rope, latent_kv, mask, scale: float):
    """torch SDPA on the absorbed inputs: one KV head [c_KV ; k_R], value c_KV, query heads as rows."""
    b, h, _, d_c = q_latent.shape
    q = torch.cat([q_latent, q_rope], dim=-1).view(b, 1, h, -1)
    out = F.scaled_dot_product_attention(q, latent_kv.unsqueeze(1), latent_kv[..., :d_c].unsqueeze(1),
                                         attn_mask=mask, scale=scale)
    return out.view(b, h, 1, d_c)


def measure_case(batch: int, cache_len: int, heads: int, dtype: torch.dtype, configs, copy_bps: float,
                 timer: Callable[[Callable[[], object]], float], device: str = "cuda", seed: int = 0) -> list[dict]:
    """One row per kernel config; SDPA and the reference are computed once per case."""
    from mla_fx.kernels.latent_attention import bytes_moved, latent_attention_decode
    from mla_fx.ops import latent_attention_reference

    q_latent, q_rope, latent_kv, mask = inputs(batch, cache_len, heads, dtype, device, seed)
    ref = latent_attention_reference(q_latent.float(), q_rope.float(), latent_kv.float(), mask, SCALE, False)
    sdpa_err = rel_err(sdpa_mqa(q_latent, q_rope, latent_kv, mask, SCALE), ref)
    sdpa_s = timer(lambda: sdpa_mqa(q_latent, q_rope, latent_kv, mask, SCALE))
    nbytes = bytes_moved(batch, heads, cache_len, D_C, D_R, latent_kv.element_size())
    rows = []
    for block_h, block_n, num_warps in configs:
        def run(block_h=block_h, block_n=block_n, num_warps=num_warps):
            return latent_attention_decode(q_latent, q_rope, latent_kv, SCALE, key_mask=mask, block_h=block_h,
                                           block_n=block_n, num_warps=num_warps)

        err = rel_err(run(), ref)
        kernel_s = timer(run) if err <= 2e-2 else float("nan")
        rows.append({"batch": batch, "cache_tokens": cache_len, "heads": heads, "dtype": str(dtype).split(".")[-1],
                     "config": f"h{block_h}/n{block_n}/w{num_warps}", "kernel_ms": kernel_s * 1e3,
                     "kernel_gbs": nbytes / kernel_s / 1e9, "of_copy": nbytes / kernel_s / copy_bps,
                     "sdpa_ms": sdpa_s * 1e3, "sdpa_over_kernel": sdpa_s / kernel_s,
                     "kernel_rel_err": err, "sdpa_rel_err": sdpa_err})
    return rows


def summary(rows: list[dict], copy_bps: float) -> list[str]:
    """Per case, the best config against the aim."""
    lines = []
    for case in dict.fromkeys((r["batch"], r["cache_tokens"]) for r in rows):
        timed = [r for r in rows if (r["batch"], r["cache_tokens"]) == case and r["of_copy"] == r["of_copy"]]
        if not timed:
            lines.append(f"- batch {case[0]}, cache {case[1]}: no config passed the correctness check")
            continue
        best = max(timed, key=lambda r: r["of_copy"])
        lines.append(f"- batch {case[0]}, cache {case[1]}: best {best['config']} {best['kernel_gbs']:.0f} GB/s = "
                     f"{best['of_copy']:.0%} of copy ({copy_bps / 1e9:.0f} GB/s; aim > {AIM:.0%}: "
                     f"{'met' if best['of_copy'] > AIM else 'NOT met'}); SDPA {best['sdpa_over_kernel']:.1f}x slower")
    return lines


def machine_text() -> str:
    import triton

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; {platform.platform()}; torch {torch.__version__}, triton {triton.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one case, the default config only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_gpu needs a CUDA GPU; none on this machine (the CPU suite is python -m benchmarks.run_all)",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernel_gpu needs triton: pip install 'mla-fx[triton]'", file=sys.stderr)
        return 2
    copy_bps = copy_bandwidth(cuda_timer, "cuda")
    rows = []
    for batch, cache_len in grid(a.quick):
        rows += measure_case(batch, cache_len, HEADS, torch.bfloat16, CONFIGS[:1] if a.quick else CONFIGS,
                             copy_bps, cuda_timer)
        torch.cuda.empty_cache()
    command = "python -m benchmarks.kernel_gpu" + (" --quick" if a.quick else "")
    text = table(f"Triton decode kernel vs copy bandwidth and torch SDPA (`{command}`)", COLUMNS, rows,
                 "\n".join(summary(rows, copy_bps)),
                 machine_text=f"{machine_text()}; copy bandwidth {copy_bps / 1e9:.0f} GB/s")
    print(text, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    write_csv(a.out / "kernel_gpu.csv", rows)
    (a.out / "kernel_gpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
