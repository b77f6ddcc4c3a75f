"""Lower complex-number RoPE (HF DeepseekV2: torch.polar / view_as_complex) to real arithmetic.

ONNX has no complex tensors, so `torch.onnx.export` fails on these graphs. Every complex value is
tracked as a (real, imaginary) pair of real tensors:

Before:
    f = polar(ones, freqs);  xc = view_as_complex(view(x, [..., d/2, 2]))
    y = view_as_real(xc * unsqueeze(f, 1))
After:
    fr, fi = cos(freqs), sin(freqs);  xr, xi = select(x2, -1, 0), select(x2, -1, 1)
    y = stack([xr*fr' - xi*fi', xr*fi' + xi*fr'], -1)

The same interleaved RoPE, in the same precision, with no complex dtype left. It is not bit-exact:
PyTorch's vectorized complex multiply uses fused multiply-adds, so results differ at float32 rounding
(HF computes this RoPE in complex64 even for float64 models). The export pipeline runs it; the absorb
pipeline, held to 1e-10 in float64, does not need it.
"""

from __future__ import annotations

import torch
from torch import fx

from ._graph import LAYOUT_OPS
from .context import PassContext
from .manager import PassResult

aten = torch.ops.aten
COMPLEX_SOURCES = {aten.view_as_complex.default, aten.polar.default}


def lower_complex(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    g = gm.graph
    parts: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    lowered = 0

    def call(target, *args):
        return g.call_function(target, args)

    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        complex_args = [a for a in node.args if isinstance(a, fx.Node) and a in parts]
        if node.target not in COMPLEX_SOURCES and not complex_args:
            continue
        with g.inserting_before(node):
            if node.target is aten.view_as_complex.default:
                x = node.args[0]
                parts[node] = (call(aten.select.int, x, -1, 0), call(aten.select.int, x, -1, 1))
            elif node.target is aten.polar.default:
                mag, angle = node.args
                parts[node] = (call(aten.mul.Tensor, mag, call(aten.cos.default, angle)),
                               call(aten.mul.Tensor, mag, call(aten.sin.default, angle)))
            elif node.target is aten.mul.Tensor:
                a, b = node.args
                if a in parts and isinstance(b, fx.Node) and b in parts:
                    (ar, ai), (br, bi) = parts[a], parts[b]
                    parts[node] = (call(aten.sub.Tensor, call(aten.mul.Tensor, ar, br), call(aten.mul.Tensor, ai, bi)),
                                   call(aten.add.Tensor, call(aten.mul.Tensor, ar, bi), call(aten.mul.Tensor, ai, br)))
                else:
                    (cr, ci), s = (parts[a], b) if a in parts else (parts[b], a)
                    parts[node] = (call(aten.mul.Tensor, cr, s), call(aten.mul.Tensor, ci, s))
            elif node.target in LAYOUT_OPS:
                re, im = parts[node.args[0]]
                parts[node] = tuple(g.call_function(node.target, (p, *node.args[1:]), dict(node.kwargs))
                                    for p in (re, im))
            elif node.target is aten.view_as_real.default:
                real = call(aten.stack.default, list(parts[node.args[0]]), -1)
                real.meta.update(node.meta)
                node.replace_all_uses_with(real)
                lowered += 1
            elif node.target is aten._assert_tensor_metadata.default:
                pass  # a dtype assertion on the complex value; the parts are real
            else:  # leave the rest complex; what was lowered so far is exact
                g.eliminate_dead_code()
                return PassResult(gm, lowered > 0, {"lowered": lowered,
                                                    "unsupported": f"{node.name} ({node.target}) on a complex tensor"})
    for node in reversed(list(g.nodes)):
        if node in parts or (node.target is aten._assert_tensor_metadata.default and any(
                a in parts for a in node.args if isinstance(a, fx.Node))):
            if not node.users:
                g.erase_node(node)
    g.eliminate_dead_code()
    return PassResult(gm, lowered > 0, {"lowered": lowered})
