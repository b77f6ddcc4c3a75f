"""A small pass manager: pipelines are lists of passes (named in mla_fx/pipelines.py), each
`(gm, context) -> PassResult`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import fx

from mla_fx.errors import MLAFXError, PassError

from .context import PassContext


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    __name__: str

    def __call__(self, gm: fx.GraphModule, context: PassContext | None = None) -> PassResult: ...


AfterPass = Callable[[str, PassResult], None]


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], context: PassContext | None = None,
               after_pass: AfterPass | None = None) -> tuple[fx.GraphModule, dict[str, dict]]:
    """Run `passes` in order; a failure is re-raised naming the pass and those that ran before it.

    `after_pass(name, result)` is called after each pass (progress, per-pass checks, graph dumps);
    an MLAFXError it raises is reported as coming from that pass.
    """
    stats: dict[str, dict] = {}
    done: list[str] = []
    for p in passes:
        name = p.__name__
        try:
            result = p(gm, context)
            gm = result.gm
            gm.graph.lint()
            gm.recompile()
            stats[name] = result.stats
            if after_pass is not None:
                after_pass(name, result)
        except MLAFXError as e:
            if isinstance(e, PassError):
                raise
            raise type(e)(f"{e} (in pass {name}, after {done or 'no other pass'})") from e
        except Exception as e:
            raise PassError(f"pass {name} failed after {done or 'no other pass'}: "
                            f"{type(e).__name__}: {e}") from e
        done.append(name)
    return gm, stats
