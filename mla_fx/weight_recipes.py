"""Weights as transforms of the original tensors: recorded while the passes run on meta weights, replayed
on real tensors one at a time.

The passes compute new weights from the model's own (``w_kv[kmap]``, ``einsum(w_uk.double(), w_q...)``,
``.to(dtype)``). On a structure captured with meta weights those computations give shapes and dtypes but
no values. While :class:`RecordTransforms` is active, every torch operation that reads a meta tensor with
a recipe records itself on its result, so a weight the passes register carries the whole computation from
the original tensors it came from: a :class:`Recipe` tree whose leaves are :class:`Source` names. Replaying
it on real tensors (fetched from a checkpoint by name) gives exactly what the passes would have computed
on a model in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

_ATTR = "_mla_fx_recipe"


@dataclass(frozen=True)
class Source:
    """An original tensor, by the name the captured graph gives it (a parameter or buffer path)."""

    name: str


@dataclass(frozen=True, eq=False)
class Recipe:
    """`func(*args, **kwargs)` where tensors read from the model are Sources or Recipes."""

    func: Callable
    args: tuple
    kwargs: dict


Node = Source | Recipe


def mark_source(tensor: torch.Tensor, name: str) -> None:
    setattr(tensor, _ATTR, Source(name))


def recipe_of(tensor: torch.Tensor) -> Node | None:
    return getattr(tensor, _ATTR, None)


def carry_recipe(src: torch.Tensor, dst: torch.Tensor) -> None:
    """`dst` holds `src`'s values (a Parameter made from it): it has the same recipe."""
    if recipe_of(src) is not None:
        setattr(dst, _ATTR, recipe_of(src))


def _as_node(x: Any) -> Any:
    return recipe_of(x) or x if isinstance(x, torch.Tensor) else x


class RecordTransforms(TorchFunctionMode):
    """Records, on each result, how it was computed from tensors that carry a recipe."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tracked = [False]

        def note(x):
            if isinstance(x, torch.Tensor) and recipe_of(x) is not None:
                tracked[0] = True
            return x

        tree_map(note, (args, kwargs))
        if tracked[0] and isinstance(out, torch.Tensor):
            setattr(out, _ATTR, Recipe(func, tree_map(_as_node, args), tree_map(_as_node, kwargs)))
        return out


def sources(node: Node) -> list[str]:
    """The original tensors a recipe reads, in first-use order."""
    found: list[str] = []

    def walk(x):
        if isinstance(x, Source):
            if x.name not in found:
                found.append(x.name)
        elif isinstance(x, Recipe):
            tree_map(walk, (x.args, x.kwargs), is_leaf=lambda v: isinstance(v, (Source, Recipe)))
        return x

    walk(node)
    return found


def _float64(x: Any) -> Any:
    return torch.float64 if isinstance(x, torch.dtype) and x.is_floating_point else x


def evaluate(node: Node, fetch: Callable[[str], torch.Tensor], *, float64: bool = False) -> torch.Tensor:
    """Replay a recipe with `fetch(name)` giving the original tensors. With `float64`, the sources are read in
    float64 and every cast to a floating dtype becomes a cast to float64 (the exact value of the transform,
    before the one rounding to the model's dtype)."""
    memo: dict[int, torch.Tensor] = {}

    def run(x):
        if isinstance(x, Source):
            value = fetch(x.name)
            return value.double() if float64 and value.is_floating_point() else value
        if not isinstance(x, Recipe):
            return _float64(x) if float64 else x
        if id(x) not in memo:
            leaf = lambda v: isinstance(v, (Source, Recipe))  # noqa: E731
            args, kwargs = tree_map(run, (x.args, x.kwargs), is_leaf=leaf)
            memo[id(x)] = x.func(*args, **kwargs)
        return memo[id(x)]

    with torch.no_grad():
        return run(node)


def describe(node: Node) -> str:
    """A one-line formula for reports: einsum(getitem(kv_b_proj.weight), ...)."""
    if isinstance(node, Source):
        return node.name
    if not isinstance(node, Recipe):
        if isinstance(node, torch.Tensor):
            return f"<{tuple(node.shape)} {str(node.dtype).removeprefix('torch.')}>"
        return repr(node) if not isinstance(node, torch.dtype) else str(node).removeprefix("torch.")
    name = getattr(node.func, "__name__", str(node.func))
    parts = [describe(a) if not isinstance(a, (list, tuple)) else f"[{', '.join(describe(b) for b in a)}]"
             for a in node.args]
    parts += [f"{k}={describe(v)}" for k, v in node.kwargs.items()]
    return f"{name}({', '.join(parts)})"
