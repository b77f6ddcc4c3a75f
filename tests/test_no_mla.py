"""Models without MLA get a clear error that says what was looked for, and no output file."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from mla_fx import cli
from mla_fx.absorb import absorb
from mla_fx.errors import NoMLAError
from mla_fx.passes.capture import capture

from _zoo import has_transformers


class PlainMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(32, 16), nn.Linear(16, 32)

    def forward(self, input_ids):
        return self.proj(torch.relu(self.embed(input_ids)))


def test_plain_mlp_has_no_attention():
    gm = capture(PlainMLP(), (torch.randint(0, 32, (2, 5)),), max_seq=64)
    with pytest.raises(NoMLAError) as e:
        absorb(gm)
    assert "Looked for an attention (scaled_dot_product_attention)" in str(e.value)
    assert "no scaled_dot_product_attention at all" in str(e.value)


@pytest.mark.skipif(not has_transformers(), reason="transformers not installed")
def test_llama_attention_is_found_and_rejected_with_the_reason(tmp_path, capsys):
    from mla_fx.models.hf import tiny_llama

    model = tiny_llama()
    model.model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out.pt2"
    code = cli.main(["absorb", str(tmp_path / "llama"), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "no Multi-head Latent Attention found" in err
    assert "query is not [q_nope ; q_rope]" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert cli.main(["inspect", str(tmp_path / "llama"), "-q"]) == 1


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.config = types.SimpleNamespace(vocab_size=32)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if x.sum() > 0:  # control flow on data: torch.export cannot capture it
            return x
        return -x


def test_a_model_torch_export_cannot_capture_gets_a_clear_error(tmp_path, capsys):
    from mla_fx.errors import MLAFXError

    with pytest.raises(MLAFXError, match="torch.export could not capture DataDependent as input_ids -> logits"):
        capture(DataDependent(), (torch.randint(0, 32, (2, 5)),), max_seq=64)
    torch.save(DataDependent(), tmp_path / "m.pt")
    out = tmp_path / "out.pt2"
    assert cli.main(["absorb", str(tmp_path / "m.pt"), "--trust-pickle", "-o", str(out), "-q"]) == 1
    assert "could not capture" in capsys.readouterr().err and not out.exists()
