"""The command line on the shipped trained model and on zoo models, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from mla_fx import cli
from mla_fx.check import greedy
from mla_fx.models.tokenizer import decode, encode
from mla_fx.models.trained import load_tiny_mla

LATENT = torch.ops.mla_fx.latent_attention.default


@pytest.fixture(scope="module")
def absorbed_example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    out, report = folder / "tiny.pt2", folder / "report.json"
    assert cli.main(["absorb", "example", "-o", str(out), "--report", str(report), "-q"]) == 0
    return out, report


def test_absorbed_example_generates_the_same_text(absorbed_example):
    out, _ = absorbed_example
    program = torch.export.load(out)
    original = load_tiny_mla()
    assert sum(n.target is LATENT for n in program.graph.nodes) == original.config.num_layers
    prompt = torch.tensor([encode("The ")])
    want = greedy(original, prompt, 48)
    got = greedy(program.module(), prompt, 48)
    assert torch.equal(got, want), (decode(want[0].tolist()), decode(got[0].tolist()))
    assert sum(ch.isalpha() or ch == " " for ch in decode(got[0].tolist())) > 30


def test_absorbed_program_is_called_like_the_model_for_any_length(absorbed_example):
    out, _ = absorbed_example
    module = torch.export.load(out).module()
    original = load_tiny_mla()
    for batch, seq in ((1, 1), (3, 20), (2, 128)):
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            torch.testing.assert_close(module(ids), original(ids), rtol=1e-4, atol=1e-4)


def test_report_lists_layers_costs_and_checks(absorbed_example):
    _, report = absorbed_example
    data = json.loads(report.read_text())
    assert data["mode"] in ("reassociate", "fold")
    layer = data["layers"][0]
    spec = layer["spec"]
    assert layer["cache_bytes_per_token_bf16"]["latent"] == 2 * (spec["kv_lora_rank"] + spec["qk_rope_head_dim"])
    assert set(layer["costs"]) == {"reassociate", "fold"}
    # the cost model chose the mode with fewer weight parameters per decoded token
    assert data["mode"] == min(layer["costs"], key=lambda m: layer["costs"][m]["params"])
    assert data["checks"] and all(c["passed"] for c in data["checks"])
    assert any(c["name"].startswith("generation") for c in data["checks"])


def test_inspect_prints_one_row_per_layer(capsys):
    assert cli.main(["inspect", "zoo:reference_no_q_lora", "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 MLA site(s)" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2 and all(" None " in r for r in rows)  # no q compression


def test_check_passes_and_prints_one_line_per_comparison(capsys):
    assert cli.main(["check", "zoo:reference", "--dtypes", "float64,float32", "--generate", "8", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASSED | logits[float64") == 2 and out.count("PASSED | logits[float32") == 2
    assert "PASSED | generation[" in out and "all PASSED" in out


def test_check_a_written_program_and_dump_graphs(tmp_path, capsys):
    out = tmp_path / "ref.pt2"
    dumps = tmp_path / "graphs"
    assert cli.main(["absorb", "zoo:reference", "-o", str(out), "--mode", "fold", "--dtypes", "float32",
                     "--dump-graphs", str(dumps), "--generate", "0", "-q"]) == 0
    names = sorted(p.name for p in dumps.iterdir())
    assert names[0] == "float32_00_captured.py" and any("absorb_uv" in n for n in names)
    assert "latent_attention" in (dumps / names[-1]).read_text()
    capsys.readouterr()
    assert cli.main(["check", "zoo:reference", "--rewritten", str(out), "--generate", "8", "-q"]) == 0
    assert "all PASSED" in capsys.readouterr().out


def test_bad_arguments_exit_non_zero(tmp_path, capsys):
    assert cli.main(["absorb", str(tmp_path / "missing.pt2"), "-o", str(tmp_path / "o.pt2"), "-q"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["check", "zoo:reference", "--dtypes", "float8", "-q"]) == 2
    assert "unknown dtype" in capsys.readouterr().err
    assert not (tmp_path / "o.pt2").exists()
    assert cli.main(["check", "zoo:reference", "--dtypes", ",", "-q"]) == 2
    assert "names no dtype" in capsys.readouterr().err
    assert cli.main(["check", "example", "--generate", "200", "--dtypes", "float32", "-q"]) == 1
    assert "pass the model's 128 positions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["absorb", "example", "-o", str(tmp_path / "o.pt2"), "--generate", "-5"])
    assert "argument --generate: must be 0 or more" in capsys.readouterr().err


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not touched")
    (tmp_path / "d.pt2").mkdir()
    cases = [
        (["-o", str(tmp_path / "x.txt")], "needs MODEL to be a HF safetensors directory"),  # a folder output
        (["-o", str(tmp_path / "d.pt2")], "it exists and is a directory"),
        (["-o", str(tmp_path / "same.pt2"), "--report", str(tmp_path / "same.pt2")], "are the same file"),
        (["-o", str(tmp_path / "o.pt2"), "--report", str(weights)], "is MODEL itself"),
        (["-o", str(tmp_path / "o.pt2"), "--dump-graphs", str(weights)], "it exists and is a file"),
    ]
    for extra, message in cases:
        assert cli.main(["absorb", str(weights), "--config", str(tmp_path / "c.json"), *extra, "-q"]) == 1
        assert message in capsys.readouterr().err
    # a report that cannot be written stops the run before the program is written
    assert cli.main(["absorb", "example", "-o", str(tmp_path / "o.pt2"), "--report", str(weights / "r.json"),
                     "-q"]) == 1
    assert "is not a writable folder" in capsys.readouterr().err
    assert weights.read_bytes() == b"not touched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pt2", "w.safetensors"]


def test_outputs_get_the_usual_permissions(absorbed_example):
    for path in absorbed_example:
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_absorbed_program_is_recognised_as_such(absorbed_example, capsys):
    assert cli.main(["inspect", str(absorbed_example[0])]) == 1
    assert "this program is already absorbed" in capsys.readouterr().err
