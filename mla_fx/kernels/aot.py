"""Ahead-of-time compile of the decode kernel to PTX (no GPU needed), for the TensorRT plugin.

The plugin's engine then runs without Python. This is the single-pass variant (one split: the
program writes the final output), reading the bool mask as int8; argument order is TensorRT's:
input pointers, int32 scalars, output pointers, and nothing else (Triton's hidden scratch parameters
are removed). `assemble` runs the ptxas that ships with Triton, so CI checks that the PTX assembles
for Hopper and how many registers it takes, without a GPU.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from .latent_attention import LOG2E, latent_attention_decode_kernel, padded_width

DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
KERNEL_PARAMS = 4 + 12 + 1  # what TensorRT passes: input pointers, int32 scalars, the output pointer
SHARED_LIMIT = 48 * 1024  # TensorRT plugins launch without opting into more shared memory
JIT_NUM_STAGES = 3  # Triton's default for CUDA, which the CUDA path's launches use
HOPPER_SHARED_LIMIT = 227 * 1024  # the most shared memory one block can opt into on sm_90
# (block_h, block_n, num_stages), fastest first: 16-row tiles in 2 stages fit 48 KB in fp16/bf16 at d_c 512,
# fp32 needs 8 x 8 tiles
PLUGIN_CONFIGS = ((16, 16, 2), (16, 16, 1), (8, 8, 2), (8, 8, 1))
# The first PTX ISA version that has each target (sm_90a and the other arch-specific targets Triton
# compiles for), as PTX ISA version x 10. A driver JIT-compiles PTX up to its own CUDA version's ISA
# (CUDA 12.0: 8.0, 12.8: 8.7, 13.0: 9.0) and rejects newer PTX (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), so
# the plugin's PTX is stamped with this floor by default: every driver that can run the target runs it.
MIN_PTX_VERSION = {80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 101: 86, 103: 88, 110: 90, 120: 87, 121: 88}


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
    """(head blocks, splits, batch rows): head blocks fastest, so the programs reading one row run together."""
    return (heads + block_h - 1) // block_h, 1, batch


def main() -> None:
    """python -m mla_fx.kernels.aot DTYPE D_C D_R SCALE [cuda-path]: print as JSON the plugin's kernel, or
    (cuda-path) the single-pass and split kernels in the tiling the CUDA path launches by default."""
    import inspect
    import json
    import sys

    from .latent_attention import latent_attention_decode

    dtype, d_c, d_r, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if sys.argv[5:] != ["cuda-path"]:
        print(json.dumps(compile_for_plugin(dtype, d_c, d_r, scale).__dict__))
        return
    defaults = {k: p.default for k, p in inspect.signature(latent_attention_decode).parameters.items()}
    kernels = []
    for split in (False, True):
        compiled = compile_decode(dtype, d_c, d_r, scale, block_h=defaults["block_h"], block_n=defaults["block_n"],
                                  num_warps=defaults["num_warps"], num_stages=JIT_NUM_STAGES, split=split)
        kernels.append({"split": split, "shared_bytes": compiled.metadata.shared, "ptx": compiled.asm["ptx"]})
    print(json.dumps(kernels))


SCALAR_NAMES = ("stride_qb", "stride_qh", "stride_rb", "stride_rh", "stride_kvb", "stride_kvt", "stride_mb", "n_heads",
                "cache_len", "tokens_per_split", "stride_ob", "stride_oh")


def aligned_args(dtype: str, kv_lora_rank: int, rope_dim: int) -> list[str]:
    """The arguments the compiler may take as multiples of 16 (pointers: 16-byte aligned).

    Without these hints Triton neither vectorizes the loads nor pipelines them (no cp.async): Triton's
    own launcher derives them from the actual values, the AOT kernel has to promise them. TensorRT
    allocates tensors 256-byte aligned; a packed tensor inside another starts at a row boundary, so a
    pointer is promised aligned when its row (d_c, d_r, d_c + d_r values) is a multiple of 16 bytes.
    A scalar is promised divisible when it is a multiple of 16 whatever the batch, heads and cache length
    (each scalar is a product of those and a constant). The mask pointer and its stride are not promised."""
    itemsize = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    rows = {"q_latent_ptr": kv_lora_rank, "q_rope_ptr": rope_dim, "kv_ptr": kv_lora_rank + rope_dim,
            "out_ptr": kv_lora_rank}
    pointers = [name for name, width in rows.items() if width * itemsize % 16 == 0]
    factors = decode_scalar_args(1, 1, 1, kv_lora_rank, rope_dim)
    scalars = [name for name, value in zip(SCALAR_NAMES, factors, strict=True) if value % 16 == 0]
    return pointers + scalars


def default_ptx_version(arch: int) -> int:
    """The oldest PTX ISA that has the target: the PTX every driver that runs the GPU accepts."""
    if arch not in MIN_PTX_VERSION:
        raise ValueError(f"no known PTX ISA floor for sm_{arch}; give the PTX version (e.g. --ptx-version 9.0)")
    return MIN_PTX_VERSION[arch]


def newest_ptx_version(arch: int = 90) -> int:
    """The newest PTX ISA that Triton's bundled ptxas (hence this compiler) writes."""
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    return ptx_get_version(get_ptxas(arch).version)


def ptx_text(ptx_version: int) -> str:
    """80 -> '8.0', as .version lines and --ptx-version write it."""
    return f"{ptx_version // 10}.{ptx_version % 10}"


def check_ptx_version(ptx_version: int, arch: int) -> int:
    """ptx_version if sm_{arch} has it and this compiler can write it, else ValueError saying which bound."""
    floor, newest = MIN_PTX_VERSION.get(arch), newest_ptx_version(arch)
    if floor is not None and ptx_version < floor:
        raise ValueError(f"PTX {ptx_text(ptx_version)} predates sm_{arch} (it needs PTX {ptx_text(floor)} or later)")
    if ptx_version > newest:
        raise ValueError(f"PTX {ptx_text(ptx_version)} is newer than Triton's ptxas writes ({ptx_text(newest)})")
    return ptx_version


def resolve_ptx_version(ptx_version: int | None, arch: int) -> int:
    """The PTX version the plugin's kernel declares: the one asked for, checked, or the target's oldest."""
    return check_ptx_version(default_ptx_version(arch) if ptx_version is None else ptx_version, arch)


def ptx_version_of(ptx: str) -> int:
    """The .version a PTX module declares, as version x 10."""
    match = re.search(r"^\s*\.version (\d+)\.(\d)\s*$", ptx, re.M)
    if match is None:
        raise RuntimeError("the PTX declares no .version")
    return 10 * int(match.group(1)) + int(match.group(2))


def compile_for_plugin(dtype: str, kv_lora_rank: int, rope_dim: int, scale: float, arch: int = 90,
                       ptx_version: int | None = None) -> AotKernel:
    """The fastest of PLUGIN_CONFIGS whose shared memory fits a plugin launch, as PTX of `ptx_version`
    (default: the oldest PTX that has the target, which every driver for the GPU accepts)."""
    ptx_version = resolve_ptx_version(ptx_version, arch)
    for block_h, block_n, num_stages in PLUGIN_CONFIGS:
        try:
            return compile_decode_ptx(dtype, kv_lora_rank, rope_dim, scale, arch, block_h=block_h, block_n=block_n,
                                      num_stages=num_stages, ptx_version=ptx_version)
        except SharedMemoryTooLarge as e:
            error = e
    raise error


class SharedMemoryTooLarge(RuntimeError):
    pass


def compile_decode_ptx(dtype: str, kv_lora_rank: int, rope_dim: int, scale: float, arch: int = 90,
                       block_h: int = 16, block_n: int = 16, num_warps: int = 4, num_stages: int = 2,
                       ptx_version: int | None = None) -> AotKernel:
    """PTX of the single-pass kernel for the plugin; block_n 16 with 2 stages keeps shared memory at 37 KB
    for d_c 512, d_r 64.

    Run it in a process without TRITON_INTERPRET=1: the interpreter patches triton.language globally.
    """
    compiled = compile_decode(dtype, kv_lora_rank, rope_dim, scale, arch, block_h=block_h, block_n=block_n,
                              num_warps=num_warps, num_stages=num_stages, ptx_version=ptx_version)
    meta = compiled.metadata
    scratch = getattr(meta, "global_scratch_size", 0), getattr(meta, "profile_scratch_size", 0)
    if any(scratch):
        raise RuntimeError(f"the kernel needs global/profile scratch {scratch}; the plugin cannot provide it")
    if meta.shared > SHARED_LIMIT:
        raise SharedMemoryTooLarge(f"the kernel needs {meta.shared} bytes of shared memory (limit {SHARED_LIMIT})")
    ptx = drop_hidden_params(compiled.asm["ptx"], meta.name, KERNEL_PARAMS)
    return AotKernel(meta.name, ptx, meta.shared, meta.num_warps, block_h)


def compile_decode(dtype: str, kv_lora_rank: int, rope_dim: int, scale: float, arch: int = 90, *, block_h: int,
                   block_n: int, num_warps: int, num_stages: int, split: bool = False, ptx_version: int | None = None):
    """Triton's compiled decode kernel (PTX in .asm["ptx"], resources in .metadata) with a key mask:
    single-pass (the plugin's) or split (fp32 partials and log-sum-exps, as the CUDA path launches it
    when it splits the cache). Pointers and strides carry the alignment promises of aligned_args.
    ptx_version None: Triton's default, the newest its ptxas writes (right for the JIT path, whose driver
    is the one running)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    ptr = DTYPES[dtype]
    fn = JITFunction(latent_attention_decode_kernel.fn)  # a real JIT function even under TRITON_INTERPRET
    split_kind = "i32" if split else "constexpr"
    signature = {
        "q_latent_ptr": ptr, "q_rope_ptr": ptr, "kv_ptr": ptr, "mask_ptr": "*i8", "seq_lens_ptr": "constexpr",
        **{name: "i32" for name in SCALAR_NAMES[:10]},
        "stride_ob": "i32", "stride_oh": "i32", "stride_os": split_kind, "stride_lb": split_kind,
        "stride_lh": split_kind, "out_ptr": "*fp32" if split else ptr, "lse_ptr": "*fp32" if split else "constexpr",
        **{name: "constexpr" for name in ("SCALE_LOG2E", "D_C", "D_R", "P_C", "P_R", "BLOCK_H", "BLOCK_N", "HAS_MASK",
                                         "HAS_LENS", "UPCAST")},
    }
    constexprs = {"seq_lens_ptr": None, "SCALE_LOG2E": float(scale) * LOG2E, "D_C": kv_lora_rank, "D_R": rope_dim,
                  "P_C": padded_width(kv_lora_rank), "P_R": padded_width(rope_dim),
                  "BLOCK_H": block_h, "BLOCK_N": block_n, "HAS_MASK": True, "HAS_LENS": False,
                  "UPCAST": dtype == "fp32"}
    aligned = aligned_args(dtype, kv_lora_rank, rope_dim)
    if split:  # partials [B, H, splits, d_c] in fp32 (rows of d_c values, like out); lse [B, H, splits]
        aligned += ["lse_ptr"] + (["stride_os"] if "stride_oh" in aligned else [])
    else:
        constexprs.update(lse_ptr=None, stride_os=0, stride_lb=0, stride_lh=0)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                       attrs={(list(signature).index(name),): [["tt.divisibility", 16]]
                                              for name in aligned})
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def entry_params(ptx: str, name: str) -> list[str]:
    """The parameter declarations of the PTX entry `name`, in order."""
    head = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    if head is None:
        raise RuntimeError(f"no entry {name!r} in the PTX")
    return [p.strip() for p in head.group(1).split(",")]


def drop_hidden_params(ptx: str, name: str, keep: int) -> str:
    """The PTX with only the first `keep` entry parameters.

    Triton >= 3.3 appends a global-scratch pointer to every kernel's parameters, and >= 3.5 a profile-
    scratch pointer; TensorRT's AOT launcher passes the kernel arguments and the extra scalars only, so a
    launch would read parameter slots that were never given. With both scratch sizes 0 (checked by the
    caller) the kernel never loads them, which is checked here before they are removed."""
    params = entry_params(ptx, name)
    hidden = [p.split()[-1] for p in params[keep:]]
    used = [h for h in hidden if len(re.findall(rf"\b{re.escape(h)}\b", ptx)) > 1]
    if used:
        raise RuntimeError(f"the kernel reads its hidden parameters {used}; TensorRT would not pass them")
    if not hidden:
        return ptx
    start = ptx.index(f".entry {name}(")
    end = ptx.index(")", start)
    return ptx[:start] + f".entry {name}(\n\t" + ",\n\t".join(params[:keep]) + "\n" + ptx[end:]


def assemble(ptx: str, arch: int = 90) -> dict[str, int]:
    """Assemble the PTX with the ptxas that ships with Triton (no GPU needed): registers per thread and
    spill bytes, or RuntimeError with ptxas's message."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""  # Triton targets the arch-specific sm_90a / sm_100a
    done = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", "-", "-o", "/dev/null"],
                          input=ptx, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas rejected the kernel: {done.stderr.strip()[-1000:]}")
    report = done.stderr + done.stdout
    numbers = {key: re.search(pattern, report) for key, pattern in
               (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                ("spill_loads", r"(\d+) bytes spill loads"))}
    return {key: int(m.group(1)) for key, m in numbers.items() if m}


if __name__ == "__main__":
    main()
