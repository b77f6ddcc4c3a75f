"""TensorRT engines from an mla-fx ONNX export: step.engine and prefill.engine plus a manifest.

TensorRT's own ONNX parser maps each `mla_fx::LatentAttention` node (op_type LatentAttention,
attribute plugin_namespace "mla_fx") to the registered Python plugin, preferring its ahead-of-time
kernel (network flag PREFER_AOT_PYTHON_PLUGINS), so the engines run without Python. Networks are
strongly typed: precisions are the export's. One optimization profile per engine; the step engine
decodes one token per row (the plugin's kernel reads one query token), prompts go through prefill.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mla_fx.errors import MLAFXError
from mla_fx.outputs import atomic_directory
from mla_fx.products import ENGINE_FORMAT, ENGINE_MANIFEST, manifest_cache, read_onnx_manifest

from . import tensorrt_plugin
from .tensorrt_plugin import TRT_MESSAGE, register_plugin, require_aot_compiler, require_tensorrt

IMPLEMENTATIONS = {"aot": "PREFER_AOT_PYTHON_PLUGINS", "jit": "PREFER_JIT_PYTHON_PLUGINS"}
STEP_NEW_TOKENS = 1


def require_cuda() -> None:
    try:
        import torch

        present = torch.cuda.is_available()
    except ImportError:
        present = False
    if not present:
        raise MLAFXError(f"{TRT_MESSAGE}: no CUDA device is visible")


def plugin_ptx_version(ptx_version: int | None) -> int:
    """The AOT plugin's PTX version on this machine's GPU (kernels/aot.py resolve_ptx_version), or MLAFXError
    saying which bound it breaks; needs Triton."""
    require_aot_compiler()
    from mla_fx.kernels.aot import resolve_ptx_version

    try:
        return resolve_ptx_version(ptx_version, tensorrt_plugin.device_arch())
    except ValueError as e:
        raise MLAFXError(f"PTX version: {e}") from None


def network_flags(trt, implementation: str) -> int:
    """Bits for builder.create_network: each flag is `1 << int(flag)` (TensorRT 11 renumbered them and
    made STRONGLY_TYPED the default; EXPLICIT_BATCH is gone)."""
    flags = 0
    for name in ("STRONGLY_TYPED", IMPLEMENTATIONS[implementation]):
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def profiles(manifest: dict[str, Any], *, max_batch: int, max_new_tokens: int, max_cache: int
             ) -> dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """(min, opt, max) shape per input name and program. Step: S = 1, T_past in [0, max_cache - 1];
    prefill: S in [1, max_new_tokens]."""
    if max_batch < 1 or max_new_tokens < 1 or max_cache < 2:
        raise MLAFXError("max_batch and max_new_tokens must be >= 1 and max_cache >= 2")
    if max_new_tokens > max_cache:
        raise MLAFXError(f"max_new_tokens ({max_new_tokens}) cannot exceed max_cache ({max_cache})")
    if max_cache > manifest["max_seq"]:
        raise MLAFXError(f"max_cache ({max_cache}) exceeds the model's max_seq ({manifest['max_seq']})")
    b = (1, max_batch, max_batch)
    s = (1, min(max_new_tokens, 128), max_new_tokens)
    past = (0, max_cache // 2, max_cache - STEP_NEW_TOKENS)
    tokens = {"input_ids": s, "position_ids": s, "attention_mask": s}
    prefill = {name: tuple((b[k], s[k]) for k in range(3)) for name in tokens}
    step: dict[str, Any] = {name: tuple((b[k], STEP_NEW_TOKENS) for k in range(3))
                            for name in ("input_ids", "position_ids")}
    step["attention_mask"] = tuple((b[k], past[k] + STEP_NEW_TOKENS) for k in range(3))
    for c in manifest_cache(manifest["layers"]):
        step[c.past] = tuple((b[k], past[k], c.width) for k in range(3))
    return {"step": step, "prefill": prefill}


def _build(trt, logger, path: Path, profile_shapes: dict, implementation: str, workspace_bytes: int | None) -> bytes:
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, implementation))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MLAFXError(f"TensorRT's ONNX parser rejected {path}:\n{errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = sorted(set(names) - set(profile_shapes))
    if missing:
        raise MLAFXError(f"{path.name} has inputs {missing} that mla-fx has no shape profile for")
    for name in names:
        profile.set_shape(name, *profile_shapes[name])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MLAFXError(f"TensorRT could not build an engine from {path} (run with a verbose logger for details)")
    return bytes(serialized)


def build_engines(onnx_dir: Path, out_dir: Path, *, max_batch: int, max_new_tokens: int, max_cache: int,
                  dtype: str | None = None, implementation: str = "aot", workspace_bytes: int | None = None,
                  ptx_version: int | None = None, progress=None, verbose: bool = False,
                  verify=None) -> dict[str, Any]:
    """Build and write step.engine, prefill.engine and the manifest into `out_dir`, all or nothing.

    `ptx_version` (e.g. 80 for PTX 8.0): what the AOT kernel's PTX declares; the driver that runs the
    engines must support it. None: the oldest PTX the GPU has, which every driver for it accepts.
    `verify(folder)` runs on the finished folder before it replaces `out_dir`; if it raises, nothing is
    written and an earlier folder at `out_dir` stays."""
    trt = require_tensorrt()
    require_cuda()
    if implementation not in IMPLEMENTATIONS:
        raise MLAFXError(f"implementation must be one of {sorted(IMPLEMENTATIONS)}, not {implementation!r}")
    ptx = None
    if implementation == "aot":
        from mla_fx.kernels.aot import ptx_text

        ptx_version = tensorrt_plugin.kernel_options["ptx_version"] = plugin_ptx_version(ptx_version)
        ptx = ptx_text(ptx_version)
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    source = read_onnx_manifest(onnx_dir)
    sparse = [i for i, layer in enumerate(source["layers"]) if "index_key_dim" in layer]
    if sparse:
        raise MLAFXError(f"{onnx_dir}: layers {sparse} are sparse attention (DSA), which has no TensorRT plugin yet; "
                         "the ONNX export runs in ONNX Runtime (mla-fx generate DIR)")
    if dtype is not None and dtype != source["dtype"]:
        raise MLAFXError(f"{onnx_dir} was exported in {source['dtype']}; a strongly typed TensorRT network keeps "
                         f"the export's types: re-export with --dtype {dtype}")
    shapes = profiles(source, max_batch=max_batch, max_new_tokens=max_new_tokens, max_cache=max_cache)
    register_plugin()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    with atomic_directory(out_dir, ENGINE_MANIFEST, "mla-fx TensorRT folder") as tmp:
        programs = {}
        for name, program in source["programs"].items():
            if progress:
                progress(f"building the TensorRT {name} engine ({implementation} plugin)")
            engine = _build(trt, logger, onnx_dir / program["file"], shapes[name], implementation, workspace_bytes)
            (tmp / f"{name}.engine").write_bytes(engine)
            programs[name] = {"file": f"{name}.engine", "inputs": program["inputs"], "outputs": program["outputs"],
                              "profile": {k: [list(v) for v in shape] for k, shape in shapes[name].items()}}
        import torch

        manifest = {
            "format": ENGINE_FORMAT, "model": source.get("model", ""), "dtype": source["dtype"],
            "vocab_size": source["vocab_size"], "max_seq": source["max_seq"], "layers": source["layers"],
            "tokenizer": source.get("tokenizer"), "implementation": implementation,
            "limits": {"max_batch": max_batch, "max_new_tokens": max_new_tokens, "max_cache": max_cache,
                       "step_new_tokens": STEP_NEW_TOKENS},
            "tensorrt": trt.__version__, "device": torch.cuda.get_device_name(),
            "ptx_version": ptx,
            "compute_capability": list(torch.cuda.get_device_capability()), "programs": programs,
        }
        (tmp / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if verify is not None:
            verify(tmp)
    return manifest
