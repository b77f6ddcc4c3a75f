"""The Triton decode kernel against the reference op (interpreted on CPU, compiled on a GPU), and its
ahead-of-time compile to PTX for sm_90 without a GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton not installed (pip install 'mla-fx[triton]')")

from mla_fx.kernels.aot import (  # noqa: E402
    HOPPER_SHARED_LIMIT,
    SCALAR_NAMES,
    SHARED_LIMIT,
    AotKernel,
    aligned_args,
    assemble,
    check_ptx_version,
    decode_grid,
    decode_scalar_args,
    default_ptx_version,
    drop_hidden_params,
    entry_params,
    newest_ptx_version,
    ptx_version_of,
)
from mla_fx.kernels.latent_attention import latent_attention_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D_C, D_R = 512, 64
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _case(batch, heads, cache_len, dtype, seed=0, d_c=D_C, d_r=D_R):
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(batch, heads, 1, d_c, generator=g)
    q_rope = torch.randn(batch, heads, 1, d_r, generator=g)
    kv = torch.randn(batch, cache_len, d_c + d_r, generator=g)
    return [t.to(dtype).to(DEVICE) for t in (q_lat, q_rope, kv)]


def _reference(q_lat, q_rope, kv, mask, scale):
    return torch.ops.mla_fx.latent_attention(q_lat.double(), q_rope.double(), kv.double(), mask, scale, False)


def _rel(ref, out):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("heads", [1, 16, 128])
@pytest.mark.parametrize("cache_len", [1, 63, 64, 1000])
def test_kernel_matches_reference_float32(heads, cache_len):
    q_lat, q_rope, kv = _case(2, heads, cache_len, torch.float32)
    scale = 192 ** -0.5
    out = latent_attention_decode(q_lat, q_rope, kv, scale)
    assert out.shape == q_lat.shape
    assert _rel(_reference(q_lat, q_rope, kv, None, scale), out) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_low_precision_inputs(dtype):
    q_lat, q_rope, kv = _case(2, 16, 200, dtype)
    out = latent_attention_decode(q_lat, q_rope, kv, 0.1)
    assert out.dtype == dtype
    assert _rel(_reference(q_lat, q_rope, kv, None, 0.1), out) <= TOL[dtype]


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_rows_of_different_lengths_and_split_k(splits):
    q_lat, q_rope, kv = _case(3, 16, 130, torch.float32, seed=2)
    lens = torch.tensor([130, 1, 77], dtype=torch.int32, device=DEVICE)
    mask = (torch.arange(130, device=DEVICE)[None, :] < lens[:, None]).reshape(3, 1, 1, 130)
    out = latent_attention_decode(q_lat, q_rope, kv, 0.2, seq_lens=lens, num_splits=splits)
    assert _rel(_reference(q_lat, q_rope, kv, mask, 0.2), out) <= 1e-5
    # the same through a key mask (left padding), the form the exported graphs pass
    out_mask = latent_attention_decode(q_lat, q_rope, kv, 0.2, key_mask=mask, num_splits=splits)
    assert _rel(_reference(q_lat, q_rope, kv, mask, 0.2), out_mask) <= 1e-5


@pytest.mark.parametrize("d_c,d_r", [(32, 8), (8, 4)])
def test_parts_narrower_than_a_dot_are_padded(d_c, d_r):
    """tl.dot takes at least 16 columns: narrower parts (the zoo's d_r 8) are padded with masked columns."""
    q_lat, q_rope, kv = _case(2, 5, 70, torch.float32, seed=4, d_c=d_c, d_r=d_r)
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :9] = False
    out = latent_attention_decode(q_lat, q_rope, kv, 0.3, key_mask=mask, num_splits=2)
    assert out.shape == q_lat.shape
    assert _rel(_reference(q_lat, q_rope, kv, mask, 0.3), out) <= 1e-5


def test_left_padding_mask():
    q_lat, q_rope, kv = _case(2, 16, 40, torch.float32, seed=3)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    mask[1, ..., :25] = False  # row 1 was left-padded by 25 tokens
    out = latent_attention_decode(q_lat, q_rope, kv, 0.2, key_mask=mask, num_splits=2)
    assert _rel(_reference(q_lat, q_rope, kv, mask, 0.2), out) <= 1e-5


def test_kernel_rejects_what_it_cannot_do():
    q_lat, q_rope, kv = _case(1, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="one query token"):
        latent_attention_decode(q_lat.expand(1, 16, 2, D_C), q_rope.expand(1, 16, 2, D_R), kv, 0.1)
    with pytest.raises(ValueError, match="latent_kv must be"):
        latent_attention_decode(q_lat, q_rope, kv[..., :-1], 0.1)


def _compile_in_clean_process(dtype: str, *extra: str):
    """The interpreter (TRITON_INTERPRET=1, set for these tests on CPU) patches triton.language for the
    whole process, so the real compiler runs in a process of its own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "mla_fx.kernels.aot", dtype, str(D_C), str(D_R), str(192 ** -0.5),
                           *extra], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result if extra else AotKernel(**result)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_aot_compiles_to_ptx_for_sm90_without_a_gpu(dtype):
    kernel = _compile_in_clean_process(dtype)
    assert kernel.name == "latent_attention_decode_kernel"
    assert re.search(rf"\.visible \.entry {kernel.name}\(", kernel.ptx)
    assert ".target sm_90" in kernel.ptx
    # the oldest PTX ISA with sm_90a, not the 9.4 of Triton's bundled ptxas that drivers before CUDA 13.4 reject
    assert ptx_version_of(kernel.ptx) == 80
    assert 0 < kernel.shared_bytes < SHARED_LIMIT and kernel.num_warps == 4
    # exactly what TensorRT passes: 4 input pointers, the 12 int32 scalars, the output pointer (Triton's
    # hidden scratch pointers removed)
    params = [p.split()[1] for p in entry_params(kernel.ptx, kernel.name)]
    assert len(decode_scalar_args(2, 128, 4096, D_C, D_R)) == 12
    assert params == [".u64"] * 4 + [".u32"] * 12 + [".u64"]
    assert decode_grid(8, 128, kernel.block_h) == (128 // kernel.block_h, 1, 8)
    # the PTX TensorRT gets assembles for Hopper, without spilling registers, and its cache loads are
    # vectorized and pipelined (cp.async): both need the alignment promises of aligned_args
    report = assemble(kernel.ptx, 90)
    assert report["spill_stores"] == report["spill_loads"] == 0 and report["registers"] <= 255
    assert "cp.async.cg.shared.global" in kernel.ptx


def test_ptx_version_bounds():
    """A PTX version the target does not have, or that Triton's ptxas cannot write, is refused by name."""
    assert default_ptx_version(90) == 80 and default_ptx_version(100) == 86
    assert check_ptx_version(84, 90) == 84 and check_ptx_version(newest_ptx_version(90), 90) >= 90
    with pytest.raises(ValueError, match=r"PTX 7\.8 predates sm_90 \(it needs PTX 8\.0 or later\)"):
        check_ptx_version(78, 90)
    with pytest.raises(ValueError, match="newer than Triton's ptxas writes"):
        check_ptx_version(newest_ptx_version(90) + 1, 90)
    with pytest.raises(ValueError, match="no known PTX ISA floor for sm_75"):
        default_ptx_version(75)


def test_cuda_path_kernels_compile_for_hopper_without_spills():
    """The tiling mla_fx::latent_attention launches on CUDA, single-pass and split, at DeepSeek-V3 sizes in
    bf16: within an sm_90 block's shared memory, no register spills, cache loads pipelined."""
    kernels = _compile_in_clean_process("bf16", "cuda-path")
    assert [k["split"] for k in kernels] == [False, True]
    for k in kernels:
        report = assemble(k["ptx"], 90)
        assert k["shared_bytes"] <= HOPPER_SHARED_LIMIT
        assert report["spill_stores"] == report["spill_loads"] == 0
        assert "cp.async.cg.shared.global" in k["ptx"]


def test_alignment_promises_hold_for_every_shape():
    assert aligned_args("bf16", 512, 64) == ["q_latent_ptr", "q_rope_ptr", "kv_ptr", "out_ptr", "stride_qb",
                                             "stride_qh", "stride_rb", "stride_rh", "stride_kvb", "stride_kvt",
                                             "stride_ob", "stride_oh"]
    # rows of 4 x 2 bytes (q_rope) and 36 x 2 bytes (the cache) are not 16-byte multiples
    small = aligned_args("fp16", 32, 4)
    assert "q_rope_ptr" not in small and "kv_ptr" not in small and "stride_kvt" not in small
    for batch, heads, cache_len in ((1, 1, 1), (3, 5, 77), (64, 128, 4096)):
        values = dict(zip(SCALAR_NAMES, decode_scalar_args(batch, heads, cache_len, 512, 64), strict=True))
        assert all(values[name] % 16 == 0 for name in aligned_args("fp16", 512, 64) if name in values)


PTX_WITH_SCRATCH = """.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2
)
{
\tld.param.b64 %rd1, [k_param_0];
\tld.param.b32 %r1, [k_param_1];
BODY}
"""


def test_hidden_params_are_dropped_only_when_unused():
    unused = PTX_WITH_SCRATCH.replace("BODY", "")
    dropped = drop_hidden_params(unused, "k", 2)
    assert entry_params(dropped, "k") == [".param .u64 .ptr .global .align 1 k_param_0",
                                          ".param .u32 k_param_1"]
    assert dropped.split("{")[1] == unused.split("{")[1]
    with pytest.raises(RuntimeError, match="reads its hidden parameters"):
        drop_hidden_params(PTX_WITH_SCRATCH.replace("BODY", "\tld.param.b64 %rd2, [k_param_2];\n"), "k", 2)


def test_scalar_args_are_the_strides_of_contiguous_tensors():
    b, h, t = 2, 128, 300
    q = torch.empty(b, h, 1, D_C)
    kv = torch.empty(b, t, D_C + D_R)
    args = decode_scalar_args(b, h, t, D_C, D_R)
    assert args[:2] == [q.stride(0), q.stride(1)] and args[4:6] == [kv.stride(0), kv.stride(1)]
    assert args[7:10] == [h, t, t]


def test_op_cuda_path_uses_the_kernel_for_decode_and_reference_math_otherwise():
    from mla_fx.ops import kernel_eligible, latent_attention_with_kernel

    assert torch._C._dispatch_has_kernel_for_dispatch_key("mla_fx::latent_attention", "CUDA")
    q_lat, q_rope, kv = _case(2, 16, 50, torch.float32, seed=4)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :10] = False
    assert kernel_eligible(q_lat, q_rope, mask)
    out = latent_attention_with_kernel(q_lat, q_rope, kv, mask, 0.2, False)
    assert _rel(_reference(q_lat, q_rope, kv, mask, 0.2), out) <= 1e-5
    # several query tokens (prefill through the step program) fall back to the reference math
    q2, r2 = q_lat.expand(2, 16, 3, D_C).contiguous(), q_rope.expand(2, 16, 3, D_R).contiguous()
    assert not kernel_eligible(q2, r2, None)
    out2 = latent_attention_with_kernel(q2, r2, kv, None, 0.2, True)
    from mla_fx.ops import latent_attention_reference

    assert torch.equal(out2, latent_attention_reference(q2, r2, kv, None, 0.2, True))
