"""Absorb: the ABSORB pipeline (mla_fx/pipelines.py) on a captured graph, with the MLA analysis computed once and
the mode resolved from it: find MLA, split the RoPE score, absorb W_UK and W_UV, latent attention."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from mla_fx import ops, pipelines  # noqa: F401  (ops: registers the mla_fx:: ops the passes insert)
from mla_fx.cost import MODES, choose_mode, mode_costs
from mla_fx.errors import MLAFXError, NoMLAError
from mla_fx.outputs import atomic_file
from mla_fx.passes.capture import export_program
from mla_fx.passes.context import Analysis, PassContext, analyze
from mla_fx.passes.find_mla_sites import MLASite, no_mla_message
from mla_fx.passes.manager import AfterPass, run_passes


@dataclass
class AbsorbConfig:
    """Settings of one absorb run; serialisable into the report."""

    mode: str = "auto"  # auto | reassociate | fold

    def __post_init__(self):
        if self.mode not in ("auto", *MODES):
            raise ValueError(f"mode must be auto, reassociate or fold, not {self.mode!r}")


@dataclass
class AbsorbResult:
    gm: fx.GraphModule
    mode: str
    sites: list[MLASite]
    pass_stats: dict[str, dict] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        costs = [{m: c.to_dict() for m, c in mode_costs(s.spec).items()} if s.spec.hidden_size else None
                 for s in self.sites]
        return {"mode": self.mode, "layers": [
            {**site.to_dict(), "cache_bytes_per_token_bf16": site.spec.cache_bytes_per_token(2), "costs": c}
            for site, c in zip(self.sites, costs, strict=True)], "passes": self.pass_stats}


def resolve_mode(mode: str, sites: Sequence[MLASite]) -> str:
    if mode != "auto":
        return mode
    if any(s.spec.hidden_size is None for s in sites):
        return "reassociate"
    return choose_mode([s.spec for s in sites])


def absorb(gm: fx.GraphModule, config: AbsorbConfig | None = None, after_pass: AfterPass | None = None,
           pipeline: Sequence[Callable] | None = None, analysis: Analysis | None = None) -> AbsorbResult:
    """Rewrite a captured graph in place; returns it with the sites found and per-pass stats. `analysis`: the
    graph's, where the caller has it already."""
    config = config or AbsorbConfig()
    analysis = analysis or analyze(gm)
    if not analysis.sites:
        raise NoMLAError(no_mla_message(analysis.rejected, gm))
    mode = resolve_mode(config.mode, analysis.sites)
    gm, stats = run_passes(gm, pipeline or pipelines.ABSORB, PassContext(mode, analysis), after_pass)
    return AbsorbResult(gm, mode, list(analysis.sites), stats)


def to_program(gm: fx.GraphModule, example: tuple[torch.Tensor, ...], max_seq: int = 4096
               ) -> torch.export.ExportedProgram:
    """Re-export the rewritten graph so it is called like the original: program(input_ids) -> logits."""
    try:
        with torch.no_grad():
            return export_program(gm, example, max_seq)
    except Exception as e:
        raise MLAFXError(f"could not export the rewritten graph: {type(e).__name__}: {e}") from e


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    atomic_file(path, lambda tmp: torch.export.save(program, tmp))


def save_report(report: dict[str, Any], path: Path) -> None:
    atomic_file(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str) + "\n"))


__all__ = ["AbsorbConfig", "AbsorbResult", "absorb", "save_program", "to_program"]
