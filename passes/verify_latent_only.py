"""Verify: after the rewrite the latent is read only by latent_attention.

A linear or matmul over c_KV of every cached token is the expansion absorption exists to remove
(O(T * d_c * H * (d_nope + d_v)) work per decoded token). This pass fails if one survives, or if an
MLA site was left as an expanded attention.
"""

from __future__ import annotations

import torch
from torch import fx

from mla_fx.errors import PassError

from ._graph import SDPA, is_layout, layout_source
from .context import PassContext
from .find_mla_sites import match_site
from .manager import PassResult
from .split_rope_score import SPLIT_ATTENTION
from .to_latent_attention import LATENT_ATTENTION

aten = torch.ops.aten


def latent_readers(latent_kv: fx.Node) -> list[fx.Node]:
    """Every non-layout node that reads the c_KV source of a latent_attention's cache row."""
    c_kv_row = latent_kv.args[0][0]
    source = layout_source(c_kv_row)[0]
    readers, frontier = [], [source]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if is_layout(user):
                frontier.append(user)
            elif user is not latent_kv and user.target is not aten.sym_size.int:
                readers.append(user)
    return readers


def verify_latent_only(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    problems = []
    latent = [n for n in gm.graph.nodes if n.target is LATENT_ATTENTION]
    for node in latent:
        for reader in latent_readers(node.args[2]):
            if reader.target is not LATENT_ATTENTION:
                problems.append(f"{reader.name} ({reader.target}) reads the latent of {node.name}")
    for node in gm.graph.nodes:
        if node.target is SPLIT_ATTENTION or (node.target is SDPA and not isinstance(match_site(node), str)):
            problems.append(f"{node.name} is still an expanded MLA attention")
    if problems:
        raise PassError("the rewritten graph still expands the latent: " + "; ".join(problems))
    return PassResult(gm, False, {"latent_attention": len(latent)})
