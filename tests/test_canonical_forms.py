"""The canonical forms applied after capture (passes/distribute_query_scale.py,
passes/split_query_like_key.py): the graph changes as described and the values do not."""

from __future__ import annotations

import torch
from torch import nn

from mla_fx.passes._graph import SDPA, last_dim_parts
from mla_fx.passes.capture import capture

aten = torch.ops.aten


class Attention(nn.Module):
    """q and k of [nope 6 ; rope 4]; `style`: how the query reaches the attention."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.q, self.k_nope, self.k_rope, self.v = (nn.Linear(16, 2 * 10), nn.Linear(16, 2 * 6), nn.Linear(16, 4),
                                                    nn.Linear(16, 2 * 5))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 2, 10).transpose(1, 2)
        k_nope = self.k_nope(x).view(b, s, 2, 6).transpose(1, 2)
        k_rope = self.k_rope(x).view(b, 1, s, 4).expand(b, 2, s, 4)
        k = torch.cat([k_nope, k_rope], -1)
        if self.style == "scaled":  # Mistral 4: a per-position factor on the whole [nope ; rope] query
            scale = (1 + 0.1 * torch.arange(s, dtype=x.dtype)).view(1, 1, s, 1)
            q = torch.cat([q[..., :6], q[..., 6:] * 2], -1) * scale
        v = self.v(x).view(b, s, 2, 5).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _captured(style: str):
    """The module, an input, its captured graph and the [start, end, source] parts of the attention's query."""
    torch.manual_seed(0)
    model, x = Attention(style).eval(), torch.randn(2, 7, 16)
    gm = capture(model, (x,), max_seq=32)
    (attn,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert attn.args[0].target is aten.cat.default  # a [nope ; rope] concatenation, as the matcher wants
    return model, x, gm, last_dim_parts(attn.args[0])


def test_scale_on_the_concatenated_query_moves_onto_its_parts():
    model, x, gm, parts = _captured("scaled")
    assert len(parts) == 2 and all(src.target is aten.mul.Tensor for _, _, src in parts)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_one_piece_query_is_split_where_the_key_is_assembled():
    model, x, gm, parts = _captured("plain")
    assert [(start, end) for start, end, _ in parts] == [(0, 6), (6, 10)]
    assert all(src.target is aten.slice.Tensor for _, _, src in parts)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
