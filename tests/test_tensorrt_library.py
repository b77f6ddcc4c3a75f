"""TensorRT's own Python plugin library (tensorrt-cu12-bindings, pure Python) run over the exported
mla_fx::LatentAttention nodes, as TensorRT's ONNX parser and builder drive it. Only the C extension is
replaced (tests/_trt_standin.py says what by what); a wrong decorator, signature, annotation, type,
launch field or extra argument fails here as it would in a real engine build. tests/_trt_drive.py does
the driving in a process of its own (Triton's real compiler makes the PTX)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

pytest.importorskip("triton", reason="the AOT plugin compiles its kernel with triton")
sys.path.insert(0, str(Path(__file__).parent))
import _trt_standin  # noqa: E402

if _trt_standin.bindings_dir() is None:
    pytest.skip("tensorrt-cu12-bindings is not installed (pip install -e '.[dev]')", allow_module_level=True)

from mla_fx.export import tensorrt_plugin as plugin  # noqa: E402
from mla_fx.kernels.aot import (  # noqa: E402
    KERNEL_PARAMS,
    MIN_PTX_VERSION,
    SHARED_LIMIT,
    assemble,
    decode_grid,
    entry_params,
    ptx_version_of,
)

SHAPES = [(1, 1), (3, 77), (8, 4096)]  # (batch, cached tokens) the launch expressions are evaluated at
FLOAT_TYPES = ["FLOAT", "HALF", "BF16"]


def _drive(step_onnx: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "_trt_drive.py"), *extra, str(step_onnx),
                           *(f"{b},{t}" for b, t in SHAPES)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def step_onnx(programs, tmp_path_factory):
    from mla_fx.export.onnx import export_program

    path = tmp_path_factory.mktemp("trt") / "step.onnx"
    onnx.save(export_program(programs, "step", "custom"), path)
    return path


@pytest.fixture(scope="module")
def driven(step_onnx):
    return _drive(step_onnx)


def test_parser_creates_the_aot_plugin_from_each_node(driven, programs):
    """Each node becomes the AOT plugin under PREFER_AOT (the JIT one under PREFER_JIT), with its attributes
    as the parser converts them, in registration order."""
    assert driven["functions"] == ["LatentAttention"]
    assert len(driven["nodes"]) == len(programs.sites)
    registered = [name for name, _ in plugin.plugin_parameters()]
    for node, site in zip(driven["nodes"], programs.sites, strict=True):
        assert node["fields"] == registered
        values = node["field_values"]
        assert (values["kv_lora_rank"], values["rope_dim"]) == (site.spec.kv_lora_rank, site.spec.qk_rope_head_dim)
        assert values["scale"] == pytest.approx(site.spec.softmax_scale, rel=1e-6)
        assert values["plugin_namespace"] == "mla_fx" and node["heads"] == site.spec.n_heads
        assert (node["aot_class"], node["jit_class"]) == ("_TemplateAOTPlugin", "_TemplateJITPlugin")
        assert node["jit_serialized"] == ["scale"]  # what the JIT impl takes, serialized into the engine


def test_output_types_shapes_and_autotune_combinations(driven, programs):
    expected = [[[t, "LINEAR"]] * 3 + [["BOOL", "LINEAR"], [t, "LINEAR"]] for t in FLOAT_TYPES]
    for node, site in zip(driven["nodes"], programs.sites, strict=True):
        assert [b["type"] for b in node["builds"]] == FLOAT_TYPES
        for build in node["builds"]:
            assert build["output_types"] == [build["type"]]
            assert build["combinations"] == expected
            assert build["tactics"] == []
            for at in build["at"]:
                assert at["output_shape"] == [at["batch"], site.spec.n_heads, 1, site.spec.kv_lora_rank]


def test_launch_matches_the_kernel_entry_and_the_tensor_strides(driven, programs):
    """Grid, block and shared memory as the kernel needs them; the extra arguments are int32, one per
    scalar parameter of the PTX entry, and at every shape equal the strides of the contiguous tensors
    TensorRT hands the plugin (computed here by torch, not by the plugin's own formula)."""
    for node, site in zip(driven["nodes"], programs.sites, strict=True):
        heads, d_c, d_r = site.spec.n_heads, site.spec.kv_lora_rank, site.spec.qk_rope_head_dim
        for build in node["builds"]:
            kernel, ptx = build["kernel"], build["ptx"]
            params = [p.split()[1] for p in entry_params(ptx, build["kernel_name"])]
            assert len(params) == KERNEL_PARAMS == 4 + build["extra_arg_count"] + 1
            assert params == [".u64"] * 4 + [".u32"] * build["extra_arg_count"] + [".u64"]
            assert build["extra_arg_types"] == ["INT32"] * build["extra_arg_count"]
            assert build["launch_types"] == ["SymExprImpl"]
            assert kernel["shared_bytes"] <= SHARED_LIMIT
            for at in build["at"]:
                b, t = at["batch"], at["cache"]
                grid = decode_grid(b, heads, kernel["block_h"])
                assert at["launch"] == {"grid_x": grid[0], "grid_y": 1, "grid_z": b,
                                        "block_x": 32 * kernel["num_warps"], "block_y": 1, "block_z": 1,
                                        "shared_mem": kernel["shared_bytes"]}
                assert grid[0] * kernel["block_h"] >= heads > (grid[0] - 1) * kernel["block_h"]
                q, r = torch.empty(b, heads, 1, d_c), torch.empty(b, heads, 1, d_r)
                kv, mask, out = torch.empty(b, t, d_c + d_r), torch.empty(b, 1, 1, t), torch.empty(b, heads, 1, d_c)
                strides = [q.stride(0), q.stride(1), r.stride(0), r.stride(1), kv.stride(0), kv.stride(1),
                           mask.stride(0), heads, t, t, out.stride(0), out.stride(1)]
                assert at["extra_args"] == strides


def test_ptx_declares_the_oldest_version_the_gpu_has_and_assembles(driven):
    """Triton would stamp its bundled ptxas's version (9.4); a driver older than that rejects it."""
    for node in driven["nodes"]:
        for build in node["builds"]:
            assert ptx_version_of(build["ptx"]) == MIN_PTX_VERSION[90] == 80
    report = assemble(driven["nodes"][0]["builds"][2]["ptx"], 90)
    assert report["spill_stores"] == report["spill_loads"] == 0


def test_ptx_version_chosen_for_the_engines(step_onnx):
    chosen = _drive(step_onnx, "--ptx-version=84")
    assert {ptx_version_of(b["ptx"]) for n in chosen["nodes"] for b in n["builds"]} == {84}
