"""TensorRT plugin and engines. Without TensorRT: the plugin's registration signature equals the ONNX
node (names, order, types), the kernel interface works with symbolic shapes, and every entry point
says what to install (the PTX layout is tested in test_kernel.py). With tensorrt and a CUDA device:
engines built from an export generate what ONNX Runtime generates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from mla_fx.errors import MissingDependency
from mla_fx.export import tensorrt_plugin as plugin
from mla_fx.export.latent_attention_onnx import ATTRIBUTES, DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, function_proto

ONNX_TYPES = {float: onnx.AttributeProto.FLOAT, int: onnx.AttributeProto.INT, str: onnx.AttributeProto.STRING}


def _have_tensorrt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch
    except Exception:
        return False
    return torch.cuda.is_available()


needs_trt = pytest.mark.skipif(not _have_tensorrt_gpu(), reason="needs the tensorrt package and a CUDA device")


@pytest.fixture()
def no_tensorrt(monkeypatch):
    monkeypatch.setattr(plugin, "trt", None)
    monkeypatch.setattr(plugin, "trtp", None)
    monkeypatch.setattr(plugin, "_registered", False)


def test_plugin_name_is_the_onnx_node():
    namespace, name = plugin.PLUGIN_NAME.split("::")
    assert (namespace, name) == (DOMAIN, OP_TYPE) == (PLUGIN_NAMESPACE, OP_TYPE)


def test_plugin_parameters_equal_onnx_attributes():
    params = plugin.plugin_parameters()
    assert [(name, ONNX_TYPES[t]) for name, t in params] == list(ATTRIBUTES)


def test_plugin_tensors_equal_onnx_function_inputs():
    import inspect

    sig = inspect.signature(plugin.latent_attention_desc)
    tensors = [n for n, p in sig.parameters.items() if p.annotation is plugin.TensorDesc]
    assert tensors == list(function_proto().input)
    assert sig.return_annotation is plugin.TensorDesc
    assert all(p.default is inspect.Parameter.empty for p in sig.parameters.values())


def test_plugin_signatures_follow_tensorrt_schema():
    """tensorrt.plugin's schemas: aot_impl gets every attribute then (outputs, tactic); impl a subset then
    (outputs, stream); autotune a subset then outputs."""
    import inspect

    tensors = list(function_proto().input)
    attrs = [n for n, _ in plugin.plugin_parameters()]
    names = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert names(plugin.latent_attention_aot) == tensors + attrs + ["outputs", "tactic"]
    impl = names(plugin.latent_attention_impl)
    assert impl[:4] == tensors and impl[-2:] == ["outputs", "stream"]
    # a subset of the attributes, in registration order (tensorrt.plugin compares the signature as a sequence)
    assert impl[4:-2] and impl[4:-2] == [a for a in attrs if a in impl[4:-2]]
    assert names(plugin.latent_attention_autotune) == tensors + ["outputs"]


def test_plugin_parameters_equal_exported_node(programs):
    from mla_fx.export.onnx import export_program

    model = export_program(programs, "step", "custom")
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    assert len(nodes) == len(programs.sites)
    expected = [(name, ONNX_TYPES[t]) for name, t in plugin.plugin_parameters()]
    for node in nodes:
        assert [(a.name, a.type) for a in node.attribute] == expected
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"].decode() == plugin.PLUGIN_NAME.split("::")[0]
        assert len(node.input) == 4 and len(node.output) == 1


def test_autotune_types_cover_io():
    types = [s.strip() for s in plugin.AUTOTUNE_TYPES.split(",")]
    assert len(types) == 5  # 4 inputs + 1 output
    assert types[3] == "BOOL" and types[0] == types[1] == types[2] == types[4]
    assert {plugin.KERNEL_DTYPES[{"FP32": "FLOAT", "FP16": "HALF"}.get(t, t)] for t in types[0].split("|")} == \
        {"fp32", "fp16", "bf16"}


def test_register_plugin_without_tensorrt(no_tensorrt):
    with pytest.raises(MissingDependency, match=r"pip install 'mla-fx\[tensorrt\]'.*NVIDIA GPU"):
        plugin.register_plugin()


@pytest.mark.parametrize("version,accepted", [("10.13.3.9", False), ("10.9.0", False), ("9.2", False),
                                              ("10.14.1.48", True), ("11.4.0.106", True), ("10.14.0rc1", True)])
def test_tensorrt_version_floor(monkeypatch, version, accepted):
    """10.14: the first parser that imports ONNX Attention (the prefill program); older ones are refused
    with the reason, before any work."""
    from types import SimpleNamespace

    monkeypatch.setattr(plugin, "trt", SimpleNamespace(__version__=version))
    monkeypatch.setattr(plugin, "trtp", SimpleNamespace())
    if accepted:
        assert plugin.require_tensorrt().__version__ == version
    else:
        with pytest.raises(MissingDependency, match=rf"TensorRT {version} is too old: mla-fx needs TensorRT >= 10.14 "
                                                    r"\(the prefill program's ONNX Attention"):
            plugin.require_tensorrt()


def test_version_floor_is_the_package_metadata():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    extra = re.search(r"^tensorrt = \[(.*)\]$", pyproject, re.M).group(1)
    floor = ".".join(map(str, plugin.TENSORRT_FLOOR))
    assert f'"tensorrt>={floor}"' in extra and '"triton' in extra


def test_build_engines_without_tensorrt(no_tensorrt, tmp_path):
    from mla_fx.export.tensorrt_engine import build_engines

    with pytest.raises(MissingDependency, match=r"TensorRT engines need the tensorrt package"):
        build_engines(tmp_path / "onnx", tmp_path / "trt", max_batch=2, max_new_tokens=8, max_cache=16)
    assert not (tmp_path / "trt").exists()


def test_backend_without_tensorrt(no_tensorrt, tmp_path):
    from mla_fx.trt_backend import TensorRTBackend

    with pytest.raises(MissingDependency, match=r"mla-fx\[tensorrt\]"):
        TensorRTBackend(tmp_path)


def test_profiles_step_decodes_one_token():
    from mla_fx.errors import MLAFXError
    from mla_fx.export.tensorrt_engine import profiles

    manifest = {"max_seq": 64, "layers": [{"latent_dim": 40}, {"latent_dim": 40}]}
    p = profiles(manifest, max_batch=4, max_new_tokens=16, max_cache=32)
    assert p["step"]["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert p["step"]["past_latent.1"] == ((1, 0, 40), (4, 16, 40), (4, 31, 40))
    assert p["step"]["attention_mask"] == ((1, 1), (4, 17), (4, 32))
    assert p["prefill"]["attention_mask"] == ((1, 1), (4, 16), (4, 16))
    assert set(p["prefill"]) == {"input_ids", "position_ids", "attention_mask"}
    with pytest.raises(MLAFXError, match="max_seq"):
        profiles(manifest, max_batch=4, max_new_tokens=16, max_cache=128)


def test_network_flags_are_bit_positions():
    from types import SimpleNamespace

    from mla_fx.export.tensorrt_engine import network_flags

    fake = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(
        STRONGLY_TYPED=0, PREFER_JIT_PYTHON_PLUGINS=1, PREFER_AOT_PYTHON_PLUGINS=2))  # TensorRT 11 numbering
    assert network_flags(fake, "aot") == 0b101 and network_flags(fake, "jit") == 0b011


def test_decode_grid_and_scalars_use_only_symbolic_friendly_ops():
    """TensorRT's symbolic ints have +, -, *, // with the expression on the left (no __radd__/__rmul__)."""
    pytest.importorskip("triton")
    from mla_fx.kernels.aot import decode_grid, decode_scalar_args

    class LeftOnly:
        def __init__(self, v):
            self.v = v

        def _op(self, other, f):
            return LeftOnly(f(self.v, other.v if isinstance(other, LeftOnly) else other))

        def __add__(self, o):
            return self._op(o, int.__add__)

        def __sub__(self, o):
            return self._op(o, int.__sub__)

        def __mul__(self, o):
            return self._op(o, int.__mul__)

        def __floordiv__(self, o):
            return self._op(o, int.__floordiv__)

    b, h, t = LeftOnly(3), LeftOnly(20), LeftOnly(77)
    grid = decode_grid(b, h, 16)
    assert [g.v if isinstance(g, LeftOnly) else g for g in grid] == [2, 1, 3]
    got = [v.v if isinstance(v, LeftOnly) else v for v in decode_scalar_args(b, h, t, 512, 64)]
    assert got == decode_scalar_args(3, 20, 77, 512, 64)


@needs_trt
def test_engines_generate_like_onnx_runtime(programs, tmp_path):
    from mla_fx.export.onnx import export_onnx
    from mla_fx.export.tensorrt_engine import build_engines
    from mla_fx.ort_backend import OnnxBackend
    from mla_fx.runtime import generate
    from mla_fx.trt_backend import TensorRTBackend

    export_onnx(programs, tmp_path / "onnx")
    build_engines(tmp_path / "onnx", tmp_path / "trt", max_batch=2, max_new_tokens=16, max_cache=64)
    trt_backend, ort_backend = TensorRTBackend(tmp_path / "trt"), OnnxBackend(tmp_path / "onnx")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ids = np.array([[0, 0, 1, 2, 3], [0, 0, 0, 7, 8]])
    mask = (ids != 0).astype(np.int64)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    a, pa = trt_backend.prefill(ids, pos, mask)
    b, pb = ort_backend.prefill(ids, pos, mask)
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3)
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_allclose(x, y, atol=2e-3, rtol=2e-3)
    assert generate(trt_backend, prompts, 12) == generate(ort_backend, prompts, 12)


@needs_trt
def test_engines_jit_plugin_matches_aot(programs, tmp_path):
    from mla_fx.export.onnx import export_onnx
    from mla_fx.export.tensorrt_engine import build_engines
    from mla_fx.runtime import generate
    from mla_fx.trt_backend import TensorRTBackend

    export_onnx(programs, tmp_path / "onnx")
    for kind in ("aot", "jit"):
        build_engines(tmp_path / "onnx", tmp_path / kind, max_batch=2, max_new_tokens=16, max_cache=64,
                      implementation=kind)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate(TensorRTBackend(tmp_path / "aot"), prompts, 8) == \
        generate(TensorRTBackend(tmp_path / "jit"), prompts, 8)


@pytest.mark.skipif(_have_tensorrt_gpu(), reason="TensorRT and a GPU are present")
def test_cli_says_what_is_missing_and_writes_nothing(tmp_path, capsys):
    from mla_fx import cli

    out = tmp_path / "engines"
    assert cli.main(["export", "zoo:reference", "--trt", "-o", str(out), "-q"]) == 1
    assert "need the tensorrt package" in capsys.readouterr().err and not out.exists()
    assert cli.main(["check", "zoo:reference", "--trt", str(out), "-q"]) == 1
    assert "need the tensorrt package" in capsys.readouterr().err
    # said before the model loads: a model that does not exist is never looked at
    assert cli.main(["check", str(tmp_path / "no-such-model"), "--trt", str(out), "-q"]) == 1
    assert "need the tensorrt package" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "no-such-model"), "--trt", "--ptx-version", "8.0", "-o", str(out)]) == 1
    assert "need the tensorrt package" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["8", "eight", "8.10", "v8.0"])
def test_ptx_version_flag_is_parsed_before_anything(text, capsys):
    from mla_fx import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "zoo:reference", "--trt", "--ptx-version", text, "-o", "x"])
    assert exit_info.value.code == 2 and "a PTX ISA version looks like 8.0" in capsys.readouterr().err
