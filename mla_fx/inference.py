"""Inference programs built by passes: an absorbed decode/step program and an un-absorbed prefill
program, both over the same latent cache ([c_KV ; k_R] per token and layer)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from mla_fx import pipelines
from mla_fx.absorb import AbsorbConfig, absorb
from mla_fx.cost import crossover_tokens
from mla_fx.errors import LoadError, MLAFXError
from mla_fx.loading import LoadedModel
from mla_fx.passes._graph import SDPA
from mla_fx.passes.capture import capture
from mla_fx.passes.context import PassContext, analyze
from mla_fx.passes.find_mla_sites import MLASite, selects_keys
from mla_fx.passes.manager import run_passes
from mla_fx.products import input_names, output_names

# layer kinds of hybrid models whose state is not a KV cache (a recurrent state, convolution windows)
STATEFUL_LAYERS = ("linear_attention", "mamba", "conv")
EXAMPLE_BATCH, EXAMPLE_NEW, EXAMPLE_PAST = 2, 3, 5  # distinct, so no size is mistaken for another


@dataclass
class InferencePrograms:
    step: fx.GraphModule
    prefill: fx.GraphModule
    sites: list[MLASite]
    mode: str
    vocab_size: int
    max_seq: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_dims(self) -> list[int]:
        return [s.spec.latent_dim for s in self.sites]

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.step.parameters() if p.is_floating_point())

    def step_example(self, batch: int = EXAMPLE_BATCH, new: int = EXAMPLE_NEW, past: int = EXAMPLE_PAST):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (batch, new), generator=g)
        positions = torch.arange(past, past + new).expand(batch, -1).contiguous()
        mask = torch.ones(batch, past + new, dtype=torch.int64)
        pasts = [torch.randn(batch, past, d, generator=g).to(self.dtype) for d in self.latent_dims]
        return (ids, positions, mask, *pasts)

    def prefill_example(self, batch: int = EXAMPLE_BATCH, new: int = EXAMPLE_NEW):
        ids, positions, mask, *_ = self.step_example(batch, new, past=0)
        return ids, positions - positions[:, :1], mask

    def input_names(self, program: str) -> list[str]:
        return input_names(program, len(self.sites))

    def output_names(self) -> list[str]:
        return output_names(len(self.sites))


def positional_example(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    (ids,) = loaded.example()
    return ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1).contiguous()


def build_programs(loaded: LoadedModel, config: AbsorbConfig | None = None) -> InferencePrograms:
    """Capture the model with explicit positions, then derive both programs by passes."""
    if loaded.module is None:
        raise LoadError(f"{loaded.name} is an exported program whose positions are fixed inside it; inference "
                        "programs need the model itself (a HF or mla-fx directory, or weights with --config)")
    other_kinds = sorted({k for k in (loaded.hf_config or {}).get("layer_types") or [] if k in STATEFUL_LAYERS})
    if other_kinds:
        raise MLAFXError(f"the model mixes MLA with {', '.join(other_kinds)} layers (config layer_types): the "
                         "inference programs do not yet carry those layers' own state, so they cannot decode this "
                         "model. mla-fx absorb works on it (its MLA layers are rewritten, the others kept)")
    with torch.no_grad():
        gm = capture(loaded.module, positional_example(loaded), max_seq=loaded.max_seq)
    analysis = analyze(gm)  # once, for both programs (the copy keeps the node names)
    sparse = [n.name for n in gm.graph.nodes if n.target is SDPA and selects_keys(n)]
    if sparse:
        raise MLAFXError(f"{len(sparse)} attention(s) read only the keys a top-k selects (sparse attention, e.g. "
                         "DeepSeek-V3.2's lightning indexer): the inference programs do not yet carry the indexer's "
                         "keys in the cache, so they cannot decode this model. mla-fx absorb works on it (the "
                         "full-sequence program)")
    prefill, prefill_stats = run_passes(copy.deepcopy(gm), pipelines.PREFILL, PassContext(analysis=analysis))
    result = absorb(gm, config, analysis=analysis)
    step, step_stats = run_passes(result.gm, pipelines.STEP, PassContext(result.mode, analysis))
    return InferencePrograms(step, prefill, result.sites, result.mode, loaded.vocab_size, loaded.max_seq,
                             {**result.pass_stats, **prefill_stats, **step_stats,
                              "crossover_tokens": [crossover_tokens(s.spec) for s in result.sites]})
