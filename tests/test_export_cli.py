"""mla-fx export / generate / check --onnx from the command line, and their error handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mla_fx import cli
from mla_fx.check import greedy
from mla_fx.errors import LoadError, MLAFXError
from mla_fx.export import onnx as onnx_export
from mla_fx.models.tokenizer import decode, encode
from mla_fx.models.trained import load_tiny_mla
from mla_fx.ort_backend import OnnxBackend


@pytest.fixture(scope="module")
def example_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("example") / "onnx"
    assert cli.main(["export", "example", "--onnx", "-o", str(out), "--decode-steps", "4", "-q"]) == 0
    return out


def test_export_then_generate_prints_the_original_models_text(example_export, capsys):
    capsys.readouterr()
    prompts = ["The ", "A list of "]
    assert cli.main(["generate", str(example_export), "--prompt", prompts[0], "--prompt", prompts[1],
                     "--max-new-tokens", "48"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = load_tiny_mla()
    want = [p + decode(greedy(model, torch.tensor([encode(p)]), 48)[0].tolist()) for p in prompts]
    assert lines == want


def test_export_prints_the_cache_report(tmp_path, capsys):
    out = tmp_path / "ref"
    assert cli.main(["export", "zoo:reference", "--onnx", "-o", str(out), "--no-check", "-q"]) == 0
    text = capsys.readouterr().out
    # reference zoo sizes: d_c 32 + d_r 8 = 40 values (160 B in float32), 4 heads x (16 + 8 + 12) expanded
    assert "    0             40           160                 576                    160" in text
    assert sorted(p.name for p in out.iterdir()) == ["mla_fx_export.json", "prefill.onnx", "step.onnx", "weights.data"]


def test_check_onnx_compares_three_ways(example_export, capsys):
    assert cli.main(["check", "example", "--onnx", str(example_export), "--decode-steps", "8", "-q"]) == 0
    out = capsys.readouterr().out
    assert "PASSED | decode logits[rewritten, 8 steps]" in out and "PASSED | decode logits[onnxruntime, 8 steps]" in out


def test_check_onnx_refuses_an_export_of_another_model(example_export, capsys):
    assert cli.main(["check", "zoo:reference", "--onnx", str(example_export), "-q"]) == 1
    assert "exported from another model" in capsys.readouterr().err


def test_backend_rejects_wrong_inputs_with_clear_errors(example_export):
    backend = OnnxBackend(example_export)
    width = backend.cache[0].width
    ids, pos, mask = np.array([[1, 2]]), np.array([[0, 1]]), np.ones((1, 2), np.int64)
    past = [np.zeros((1, 0, d), np.float32) for d in (c.width for c in backend.cache)]
    with pytest.raises(MLAFXError, match="input_ids must be a 2-D array"):
        backend.step(ids[0], pos, mask, past)
    with pytest.raises(MLAFXError, match="position_ids must be int64"):
        backend.step(ids, pos.astype(np.int32), mask, past)
    with pytest.raises(MLAFXError, match=f"has {width + 1} values per token; this model caches {width}"):
        backend.step(ids, pos, mask, [np.zeros((1, 0, width + 1), np.float32)] + past[1:])
    with pytest.raises(MLAFXError, match="attention_mask must be"):
        backend.step(ids, pos, np.ones((1, 3), np.int64), past)
    with pytest.raises(MLAFXError, match="past_latent.0 must be float32"):
        backend.step(ids, pos, mask, [p.astype(np.float64) for p in past])


def test_not_an_export_directory(tmp_path, capsys):
    with pytest.raises(LoadError, match="is not an mla-fx ONNX export"):
        OnnxBackend(tmp_path)
    assert cli.main(["generate", str(tmp_path), "--ids", "1,2"]) == 1
    assert "not an mla-fx ONNX export" in capsys.readouterr().err


def test_export_into_a_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert cli.main(["export", "zoo:reference", "--onnx", "-o", str(tmp_path), "--no-check", "-q"]) == 1
    assert "is not an mla-fx ONNX export" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_failed_export_leaves_no_directory(tmp_path, monkeypatch, capsys):
    real = onnx_export.lower_program
    calls = []

    def fail_on_prefill(programs, name, attention, opset=23):
        calls.append(name)
        if name == "prefill":
            raise MLAFXError("simulated failure")
        return real(programs, name, attention, opset)

    monkeypatch.setattr(onnx_export, "lower_program", fail_on_prefill)
    out = tmp_path / "new" / "out"  # folders made for -o go too
    assert cli.main(["export", "zoo:reference", "--onnx", "-o", str(out), "--no-check", "-q"]) == 1
    assert calls == ["step", "prefill"] and list(tmp_path.iterdir()) == []


def test_generate_argument_errors(example_export, capsys):
    assert cli.main(["generate", str(example_export)]) == 1
    assert "at least one --prompt" in capsys.readouterr().err
    assert cli.main(["generate", str(example_export), "--ids", "1,x"]) == 1
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli.main(["generate", str(example_export), "--ids", "99999"]) == 1
    assert "token ids [99999] are outside the model's vocabulary [0, 256)" in capsys.readouterr().err
    assert cli.main(["generate", str(example_export), "--ids", "1,99999999999999999999999"]) == 1
    assert "outside the model's vocabulary" in capsys.readouterr().err
    assert cli.main(["generate", str(example_export), "--prompt", "Hi", "--max-new-tokens", "200"]) == 1
    assert "passes the model's 128 positions; use --max-new-tokens 126 or less" in capsys.readouterr().err
    for flag, value in (("--max-new-tokens", "0"), ("--temperature", "-1"), ("--temperature", "nan"),
                        ("--top-k", "-5"), ("--seed", "-1")):
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", str(example_export), "--prompt", "Hi", flag, value])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_damaged_exports_are_named_not_run(example_export, tmp_path, capsys):
    import json
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(example_export, truncated)
    data = (truncated / "step.onnx").read_bytes()
    (truncated / "step.onnx").write_bytes(data[: len(data) // 3])
    assert cli.main(["generate", str(truncated), "--prompt", "Hi"]) == 1
    assert "step.onnx: ONNX Runtime cannot load it" in capsys.readouterr().err

    swapped = tmp_path / "swapped"
    shutil.copytree(example_export, swapped)
    manifest = json.loads((swapped / "mla_fx_export.json").read_text())
    manifest["programs"]["step"]["inputs"].append("past_latent.9")
    (swapped / "mla_fx_export.json").write_text(json.dumps(manifest))
    assert cli.main(["generate", str(swapped), "--prompt", "Hi"]) == 1
    assert "does not belong to this export" in capsys.readouterr().err

    del manifest["layers"]
    (swapped / "mla_fx_export.json").write_text(json.dumps(manifest))
    assert cli.main(["generate", str(swapped), "--prompt", "Hi"]) == 1
    assert "the manifest lacks layers" in capsys.readouterr().err


def test_opset_below_23_is_refused(tmp_path, capsys):
    assert cli.main(["export", "zoo:reference", "--onnx", "--opset", "18", "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "needs opset 23" in capsys.readouterr().err


def test_float16_export_runs_in_onnx_runtime(tmp_path, capsys):
    out = tmp_path / "fp16"
    assert cli.main(["export", "zoo:reference", "--onnx", "--dtype", "float16", "-o", str(out),
                     "--decode-steps", "8", "-q"]) == 0
    text = capsys.readouterr().out
    assert "PASSED | decode logits[onnxruntime, 8 steps]" in text and "(tol 0.02)" in text
    backend = OnnxBackend(out)
    assert backend.float_dtype == np.float16
    import onnx

    step = onnx.load(out / "step.onnx")
    past = next(i for i in step.graph.input if i.name == "past_latent.0")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_a_failed_check_keeps_the_earlier_export(tmp_path, monkeypatch, capsys):
    import mla_fx.check_backends
    from mla_fx.check import Comparison

    out = tmp_path / "out"
    assert cli.main(["export", "zoo:reference", "--onnx", "-o", str(out), "--no-check", "-q"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    failing = Comparison("decode logits[onnxruntime]", (1,), 1.0, 1.0, 0.0, 1e-4, False)
    monkeypatch.setattr(mla_fx.check_backends, "check_backends", lambda *a, **k: [failing])
    assert cli.main(["export", "zoo:reference", "--onnx", "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"ONNX Runtime does not match the original; {out} not written" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_export_output_that_cannot_be_a_folder(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    assert cli.main(["export", "zoo:reference", "--onnx", "-o", str(tmp_path / "file.txt"), "-q"]) == 1
    assert "exists and is a file" in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "keep me"
