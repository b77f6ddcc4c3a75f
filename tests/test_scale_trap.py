"""The scale trap: a YaRN model's softmax scale survives the rewrite, and a wrong scale is caught."""

from __future__ import annotations

import pytest
import torch

from mla_fx import cli, pipelines
from mla_fx.absorb import AbsorbConfig
from mla_fx.api import absorb_and_check
from mla_fx.errors import CheckFailed
from mla_fx.loading import load_model
from mla_fx.passes.manager import PassResult

LATENT = torch.ops.mla_fx.latent_attention.default


def use_latent_width_scale(gm, config):
    """The bug several exporters shipped: scale by (d_c + d_r)^-0.5 instead of the model's scale."""
    for node in gm.graph.nodes:
        if node.target is LATENT:
            width = node.args[0].meta["val"].shape[-1] if "val" in node.args[0].meta else None
            args = list(node.args)
            args[4] = (576 if width is None else width) ** -0.5
            node.args = tuple(args)
    return PassResult(gm, True)


BROKEN = [*pipelines.ABSORB[:-1], use_latent_width_scale, pipelines.ABSORB[-1]]


def test_yarn_model_passes_and_a_wrong_scale_fails_the_check():
    loaded = load_model("zoo:reference_yarn")
    good = absorb_and_check(loaded, AbsorbConfig(), torch.float32)
    assert good.passed and good.comparisons
    bad = absorb_and_check(loaded, AbsorbConfig(), torch.float32, pipeline=BROKEN)
    assert not bad.passed
    assert all(c.rel_l2 > 1e-3 for c in bad.comparisons)


def test_check_each_pass_names_the_pass_that_breaks_numerics():
    loaded = load_model("zoo:reference_yarn")
    with pytest.raises(CheckFailed, match="numerics break in pass use_latent_width_scale"):
        absorb_and_check(loaded, AbsorbConfig(), torch.float64, each_pass=True, pipeline=BROKEN)


def test_absorb_refuses_to_write_a_failing_rewrite(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipelines, "ABSORB", BROKEN)
    out = tmp_path / "out.pt2"
    code = cli.main(["absorb", "zoo:reference_yarn", "-o", str(out), "--dtypes", "float32", "--generate", "0",
                     "-q"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED | logits[float32" in captured.out
    assert "does not match the original" in captured.err and "not written" in captured.err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file left behind
    assert cli.main(["absorb", "zoo:reference_yarn", "-o", str(out), "--dtypes", "float32", "--generate", "0",
                     "-q", "--force"]) == 0
    assert out.is_file()
