"""Float64 that is float64 throughout, so that a float64 check measures the rewrite and nothing else.

HF models compute parts of a float64 model in float32: RMSNorm casts to float32 and back, rotary
cos/sin and MoE routers run in float32. The final norm then rounds the hidden state to float32
precision, so a float64 comparison of two programs sees either exactly 0 (both round to the same
float32 values: the rewrite's 1e-16 differences vanish) or a float32-sized jump (a value near a
rounding boundary): neither measures the rewrite. Under :func:`true_float64` every request for
float32 becomes a request for float64, for the eager model and while it is captured, so both the
original and the rewritten program run in float64 everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

_CASTS = (torch.Tensor.to, torch.Tensor.type, torch.Tensor.new_empty, torch.Tensor.new_zeros,
          torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor)


class Float32AsFloat64(TorchFunctionMode):
    """Turns every float32 that a model asks for (dtype=, .to(), .type(), .float()) into float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        elif func in _CASTS:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def true_float64(dtype: torch.dtype) -> Iterator[None]:
    """Float32 means float64 inside, when checking in float64; nothing changes for other dtypes."""
    if dtype != torch.float64:
        yield
        return
    with Float32AsFloat64():
        yield


def graph_in_float64(graph: fx.Graph) -> fx.Graph:
    """A captured graph made float64 throughout: a graph captured in bfloat16 carries its casts as constants
    (RMSNorm's `.to(float32)` and back `.to(bfloat16)`, rotary cos/sin cast to the model's dtype); every floating
    dtype its nodes name becomes float64, so the graph run on float64 weights rounds nowhere else. In place."""

    def widen(value):
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return torch.float64
        return value

    for node in graph.nodes:
        node.args = fx.node.map_aggregate(node.args, widen)
        node.kwargs = fx.node.map_aggregate(node.kwargs, widen)
    return graph


def in_dtype(fn: Callable, dtype: torch.dtype) -> Callable:
    """`fn` called under :func:`true_float64` for `dtype`."""

    def call(*args, **kwargs):
        with true_float64(dtype):
            return fn(*args, **kwargs)

    return call
