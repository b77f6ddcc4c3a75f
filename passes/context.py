"""What the passes of a pipeline read besides the graph: typed, computed once before the pipeline runs.

`absorb` and `build_programs` analyse the captured graph once (:func:`analyze`: every MLA site, and why each other
attention is not one) and hand the result to every pass with the resolved absorb mode, instead of each pass
matching the graph again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import fx

from mla_fx.cost import MODES

if TYPE_CHECKING:
    from .find_mla_sites import MLASite


@dataclass(frozen=True)
class Analysis:
    sites: tuple[MLASite, ...]
    rejected: dict[str, str] = field(default_factory=dict)  # attention node -> why it is not MLA


def analyze(gm: fx.GraphModule) -> Analysis:
    from .find_mla_sites import find_sites  # the analysis imports the context's users

    sites, rejected = find_sites(gm)
    return Analysis(tuple(sites), rejected)


@dataclass(frozen=True)
class PassContext:
    mode: str = "reassociate"  # how W_UK / W_UV are absorbed: reassociate | fold
    analysis: Analysis | None = None  # None: a pass that needs the sites finds them itself

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    def sites(self, gm: fx.GraphModule) -> Analysis:
        """The analysis handed in, or (a pass run alone) the graph's."""
        return self.analysis if self.analysis is not None else analyze(gm)
