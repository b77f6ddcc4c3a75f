"""The TensorRT plugin mla_fx::LatentAttention, a Python-defined ("quickly deployable") plugin.

- `latent_attention_desc`: the registration; its parameters after the four tensors are the plugin's
  attributes, which must equal the ONNX node's (export/latent_attention_onnx.py ATTRIBUTES);
- `latent_attention_aot`: the ahead-of-time implementation, the Triton decode kernel as PTX, so the
  engine runs without Python;
- `latent_attention_impl`: a just-in-time implementation for debugging (runs Python at inference);
- `register_plugin()` applies TensorRT's decorators once.

No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as real types.
"""

import functools
import inspect
import os

from mla_fx.errors import MissingDependency, MLAFXError

TRT_MESSAGE = "TensorRT engines need the tensorrt package (pip install 'mla-fx[tensorrt]') and an NVIDIA GPU"
# The oldest TensorRT whose ONNX parser takes both programs: the prefill program keeps SDPA, exported as
# ONNX Attention (opset 23), which the parser imports from 10.14 on. The step program's
# mla_fx::LatentAttention nodes carry a local function: the 10.1 parser imports such a node as its
# function (standard ops, Attention again) even with the plugin registered; later parsers prefer a
# registered plugin, the newest when the node has a plugin_namespace attribute, as ours do.
TENSORRT_FLOOR = (10, 14)
FLOOR_REASON = ("the prefill program's ONNX Attention nodes (opset 23) parse from TensorRT 10.14 on, and the "
                "parser must prefer the registered mla_fx plugin over the node's local function")

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except Exception:  # not installed, or PyPI's download stub that fails at import
    trt = trtp = None


class _StandIn:
    """Takes the place of a tensorrt.plugin class when TensorRT is absent, so signatures stay inspectable."""


TensorDesc = getattr(trtp, "TensorDesc", None) or type("TensorDesc", (_StandIn,), {})
Tensor = getattr(trtp, "Tensor", None) or type("Tensor", (_StandIn,), {})
KernelLaunchParams = getattr(trtp, "KernelLaunchParams", None) or type("KernelLaunchParams", (_StandIn,), {})
SymIntExprs = getattr(trtp, "SymIntExprs", None) or type("SymIntExprs", (_StandIn,), {})
AutoTuneCombination = getattr(trtp, "AutoTuneCombination", None) or type("AutoTuneCombination", (_StandIn,), {})

PLUGIN_NAME = "mla_fx::LatentAttention"
# q_latent, q_rope, latent_kv share the float type; the mask is bool; the output is like q_latent
AUTOTUNE_TYPES = "FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, BOOL, FP32|FP16|BF16"
KERNEL_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> compile_for_plugin
_TORCH_VIEWS = {"FLOAT": ("float32", "<f4"), "HALF": ("float16", "<f2"), "BF16": ("bfloat16", "<i2"),
                "BOOL": ("bool", "|b1"), "INT8": ("int8", "|i1"), "INT32": ("int32", "<i4"),
                "INT64": ("int64", "<i8")}
_registered = False


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.14.1.48' -> (10, 14, 1, 48); the leading numeric parts only."""
    parts = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def require_tensorrt():
    """The tensorrt module at TENSORRT_FLOOR or newer, or MissingDependency saying what to install."""
    if trt is None or trtp is None:
        raise MissingDependency(TRT_MESSAGE)
    found = getattr(trt, "__version__", "unknown")
    if version_tuple(found)[:2] < TENSORRT_FLOOR:
        floor = ".".join(map(str, TENSORRT_FLOOR))
        raise MissingDependency(f"TensorRT {found} is too old: mla-fx needs TensorRT >= {floor} ({FLOOR_REASON}); "
                                "pip install -U 'mla-fx[tensorrt]'")
    return trt


def require_aot_compiler() -> None:
    """The ahead-of-time plugin compiles its kernel with Triton at engine build time."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MissingDependency("the ahead-of-time TensorRT plugin compiles its kernel with Triton: "
                                "pip install 'mla-fx[tensorrt]' (or use --plugin jit)") from None


def latent_attention_desc(q_latent: TensorDesc, q_rope: TensorDesc, latent_kv: TensorDesc, attn_mask: TensorDesc,
                          scale: float, kv_lora_rank: int, rope_dim: int, plugin_namespace: str) -> TensorDesc:
    """o~ [B, H, S, d_c], like q_latent (MQA over the latent row; V = the row's first d_c values)."""
    return q_latent.like()


def plugin_parameters() -> list[tuple[str, type]]:
    """The registered attributes (name, Python type) in order: the parameters after the tensors."""
    return [(p.name, p.annotation) for p in inspect.signature(latent_attention_desc).parameters.values()
            if not (isinstance(p.annotation, type) and issubclass(p.annotation, TensorDesc))]


def latent_attention_autotune(q_latent: TensorDesc, q_rope: TensorDesc, latent_kv: TensorDesc,
                              attn_mask: TensorDesc, outputs: tuple[TensorDesc]) -> list[AutoTuneCombination]:
    return [trtp.AutoTuneCombination(AUTOTUNE_TYPES)]


def device_arch() -> int:
    """Compute capability of the GPU the engine is built on, as Triton's target wants it (90 for sm_90)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except ImportError:
        pass
    return 90


# The PTX ISA version the engines' kernels declare (None: the oldest the GPU has, see kernels/aot.py);
# build_engines sets it before TensorRT calls the plugin.
kernel_options = {"ptx_version": None}


@functools.cache
def compile_kernel(dtype: str, kv_lora_rank: int, rope_dim: int, scale: float, arch: int,
                   ptx_version: int | None = None):
    """PTX of the single-pass decode kernel, in the fastest tiling whose shared memory fits 48 KB."""
    from mla_fx.kernels.aot import compile_for_plugin

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise MLAFXError("the plugin's kernel is compiled to PTX by Triton's compiler: unset TRITON_INTERPRET")
    return compile_for_plugin(dtype, kv_lora_rank, rope_dim, scale, arch, ptx_version)


def latent_attention_aot(q_latent: TensorDesc, q_rope: TensorDesc, latent_kv: TensorDesc, attn_mask: TensorDesc,
                         scale: float, kv_lora_rank: int, rope_dim: int, plugin_namespace: str,
                         outputs: tuple[TensorDesc], tactic: int
                         ) -> tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]:
    """Kernel name, PTX, launch grid and the int32 scalars, all in terms of the inputs' symbolic shapes.

    TensorRT passes every registered attribute, in registration order. The kernel reads one query
    token per row (S == 1): the step engine's profile fixes S to 1."""
    from mla_fx.kernels.aot import decode_grid, decode_scalar_args

    kernel = compile_kernel(KERNEL_DTYPES[q_latent.dtype.name], int(kv_lora_rank), int(rope_dim), float(scale),
                            device_arch(), kernel_options["ptx_version"])
    batch, heads = q_latent.shape_expr[0], q_latent.shape_expr[1]
    cache_len = latent_kv.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = decode_grid(batch, heads, kernel.block_h)
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared_bytes
    scalars = decode_scalar_args(batch, heads, cache_len, int(kv_lora_rank), int(rope_dim))
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])  # TensorRT wants SymInt32 each
    return kernel.name, kernel.ptx, launch, extra


def torch_view(t):
    """A torch CUDA tensor over a trtp.Tensor's buffer (bf16 through an int16 view: TensorRT's
    __cuda_array_interface__ refuses bf16)."""
    import torch

    torch_dtype, typestr = _TORCH_VIEWS[t.dtype.name]
    itemsize = int(typestr[2:])
    interface = {"shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr, False), "version": 3,
                 "strides": tuple(s * itemsize for s in t.strides), "stream": None}
    holder = type("CudaArray", (), {"__cuda_array_interface__": interface})()
    view = torch.as_tensor(holder, device="cuda")
    return view.view(getattr(torch, torch_dtype))


def latent_attention_impl(q_latent: Tensor, q_rope: Tensor, latent_kv: Tensor, attn_mask: Tensor, scale: float,
                          outputs: tuple[Tensor], stream: int) -> None:
    """JIT implementation (debugging): the Triton decode kernel through its torch wrapper, on TensorRT's stream."""
    import torch

    from mla_fx.kernels.latent_attention import latent_attention_decode

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        q, r, kv, mask, out = (torch_view(t) for t in (q_latent, q_rope, latent_kv, attn_mask, outputs[0]))
        out.copy_(latent_attention_decode(q, r, kv, float(scale), key_mask=mask))


def register_plugin() -> None:
    """Register mla_fx::LatentAttention with TensorRT (once per process)."""
    global _registered
    if _registered:
        return
    require_tensorrt()
    namespace, name = PLUGIN_NAME.split("::")
    if not (hasattr(trtp.op, namespace) and hasattr(getattr(trtp.op, namespace), name)):
        trtp.register(PLUGIN_NAME)(latent_attention_desc)
        trtp.autotune(PLUGIN_NAME)(latent_attention_autotune)
        trtp.aot_impl(PLUGIN_NAME)(latent_attention_aot)
        trtp.impl(PLUGIN_NAME)(latent_attention_impl)
    _registered = True
