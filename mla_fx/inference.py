"""Inference programs built by passes: an absorbed decode/step program and an un-absorbed prefill
program, both over the same latent cache ([c_KV ; k_R] per token and layer)."""

from __future__ import annotations

import copy
import re
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from mla_fx import pipelines
from mla_fx.absorb import AbsorbConfig, absorb
from mla_fx.checkpoint import Checkpoint
from mla_fx.cost import crossover_tokens
from mla_fx.errors import LoadError, MLAFXError, UnstreamableCheckpoint
from mla_fx.loading import LoadedModel
from mla_fx.passes._key_selection import cached_selections
from mla_fx.passes.capture import capture
from mla_fx.passes.context import PassContext, analyze
from mla_fx.passes.find_mla_sites import MLASite
from mla_fx.passes.manager import run_passes
from mla_fx.products import CacheTensor, cache_layout, input_names, output_names
from mla_fx.weight_recipes import RecordTransforms, Source, carry_recipe, evaluate, recipe_of
from mla_fx.weight_recipes import sources as recipe_sources

if TYPE_CHECKING:
    from mla_fx.checkpoint_params import CheckpointParameters

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
    # where weights on meta come from (programs built on a checkpoint's structure): a graph parameter's value,
    # read from the checkpoint's shards; the rewrite's new weights are computed from those by their recipes
    fetch: CheckpointParameters | None = None
    note: str | None = None  # what was built instead of the checkpoint's class (a multimodal model's text decoder)

    def program(self, name: str) -> fx.GraphModule:
        return self.step if name == "step" else self.prefill

    def _tensor(self, program: str, parameter: str) -> torch.Tensor:
        owner, _, leaf = parameter.rpartition(".")
        return getattr(self.program(program).get_submodule(owner), leaf)

    def weight(self, program: str, parameter: str) -> torch.Tensor:
        """A parameter's (or buffer's) value: in memory, or computed from the checkpoint's tensors."""
        parts = list(self.weight_parts(program, parameter))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def weight_parts(self, program: str, parameter: str) -> Iterator[torch.Tensor]:
        """The value in parts along the first dimension: a checkpoint's fused MoE experts one at a time (a
        DeepSeek-V3 layer's would be 15 GB at once), anything else whole."""
        tensor = self._tensor(program, parameter)
        if not tensor.is_meta:
            yield tensor.detach()
            return
        recipe = recipe_of(tensor)
        if recipe is None or self.fetch is None:
            raise MLAFXError(f"the {program} program's {parameter} has no value and no recorded computation")
        parts = self.fetch.parts(recipe.name) if isinstance(recipe, Source) else [evaluate(recipe, self.fetch)]
        rows = 0
        for part in parts:
            rows += part.shape[0] if part.dim() else 1
            yield part.to(tensor.dtype)
        if rows != (tensor.shape[0] if tensor.dim() else 1):
            raise MLAFXError(f"{parameter}: the checkpoint gives {rows} rows where the model has {tensor.shape[0]}")

    def weight_identity(self, program: str, parameter: str) -> Hashable | None:
        """Weights on meta are one checkpoint tensor when their recipes name one source: the same key in both
        programs. In memory: None (the programs are copies; their bytes tell)."""
        recipe = recipe_of(self._tensor(program, parameter))
        if isinstance(recipe, Source):
            return recipe.name
        return None if recipe is None else (program, parameter)

    @property
    def latent_dims(self) -> list[int]:
        return [s.spec.latent_dim for s in self.sites]

    @property
    def index_key_dims(self) -> dict[int, int]:
        """Sparse (DSA) layers that cache their indexer's keys: layer -> index_head_dim."""
        return {i: s.key_dim for i, s in cached_selections(self.sites).items()}

    @property
    def cache(self) -> list[CacheTensor]:
        return cache_layout(self.latent_dims, self.index_key_dims)

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.step.parameters() if p.is_floating_point())

    def step_example(self, batch: int = EXAMPLE_BATCH, new: int = EXAMPLE_NEW, past: int = EXAMPLE_PAST):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (batch, new), generator=g)
        positions = torch.arange(past, past + new).expand(batch, -1).contiguous()
        mask = torch.ones(batch, past + new, dtype=torch.int64)
        pasts = [torch.randn(batch, past, c.width, generator=g).to(self.dtype) for c in self.cache]
        return (ids, positions, mask, *pasts)

    def prefill_example(self, batch: int = EXAMPLE_BATCH, new: int = EXAMPLE_NEW):
        ids, positions, mask, *_ = self.step_example(batch, new, past=0)
        return ids, positions - positions[:, :1], mask

    def input_names(self, program: str) -> list[str]:
        return input_names(program, self.cache)

    def output_names(self) -> list[str]:
        return output_names(self.cache)


def positional_example(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    (ids,) = loaded.example()
    return ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1).contiguous()


def build_programs(loaded: LoadedModel, config: AbsorbConfig | None = None) -> InferencePrograms:
    """Capture the model with explicit positions, then derive both programs by passes."""
    if loaded.module is None:
        raise LoadError(f"{loaded.name} is an exported program whose positions are fixed inside it; inference "
                        "programs need the model itself (a HF or mla-fx directory, or weights with --config)")
    _refuse_stateful_layers(loaded.hf_config)
    with torch.no_grad():
        gm = capture(loaded.module, positional_example(loaded), max_seq=loaded.max_seq)
    return _programs(gm, config, loaded.vocab_size, loaded.max_seq, loaded.hf_config)


def plan_programs(checkpoint: Checkpoint, config: AbsorbConfig | None = None,
                  dtype: torch.dtype | None = None) -> InferencePrograms:
    """Both programs built on a checkpoint's structure (meta weights, every new weight's computation recorded),
    in `dtype`: their weights are read from the shards one at a time when the programs are exported."""
    from mla_fx.checkpoint_params import CheckpointParameters
    from mla_fx.structure import capture_structure
    from mla_fx.transformers_loading import unfollowed_renamings

    structure = capture_structure(checkpoint, dtype, positions=True)
    _refuse_stateful_layers(structure.hf_config)
    with RecordTransforms():
        programs = _programs(structure.fresh_graph(), config, structure.vocab_size, structure.max_seq,
                             structure.hf_config)
    for gm in (programs.step, programs.prefill):  # buffers no checkpoint holds (RoPE's inv_freq), with values
        for name, value in structure.buffers.items():
            owner, _, leaf = name.rpartition(".")
            try:
                module = gm.get_submodule(owner)
            except AttributeError:  # a module no program calls (the vision tower of a model run on text)
                continue
            if leaf in module._buffers:
                module._buffers[leaf] = value
    programs.fetch = CheckpointParameters(checkpoint, structure)
    shapes = {name: t.shape for name, t in [*structure.graph.named_parameters(), *structure.graph.named_buffers()]}
    read = {name for gm in (programs.step, programs.prefill) for t in [*gm.parameters(), *gm.buffers()]
            if t.is_meta and recipe_of(t) is not None for name in recipe_sources(recipe_of(t))}
    problems = programs.fetch.problems({name: shapes[name] for name in sorted(read)})
    if problems:
        unfollowed = unfollowed_renamings(structure.conversion_keys)
        hint = (f" (transformers renames this checkpoint's keys at load by patterns, e.g. {'; '.join(unfollowed[:2])}, "
                "which reading one weight at a time does not follow yet; transformers loads the model whole)"
                ) if unfollowed else ""
        error = UnstreamableCheckpoint if unfollowed else LoadError
        raise error(f"{checkpoint.directory}: the weights do not fit config.json{hint}: {len(problems)} "
                    f"problem(s), e.g. {'; '.join(problems[:3])}")
    programs.note = structure.note
    return programs


def _refuse_stateful_layers(hf_config: dict | None) -> None:
    other_kinds = sorted({k for k in (hf_config or {}).get("layer_types") or [] if k in STATEFUL_LAYERS})
    if other_kinds:
        raise MLAFXError(f"the model mixes MLA with {', '.join(other_kinds)} layers (config layer_types): the "
                         "inference programs do not yet carry those layers' own state, so they cannot decode this "
                         "model. mla-fx absorb works on it (its MLA layers are rewritten, the others kept)")


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy whose weights keep their recipes (deepcopy drops the attribute)."""
    out = copy.deepcopy(gm)
    tensors = dict([*out.named_parameters(), *out.named_buffers()])
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        carry_recipe(tensor, tensors[name])
    return out


def _sliding_windows(sites: Sequence[MLASite], hf_config: dict | None) -> None:
    """Each site's sliding window, where config.json's layer_types makes its layer a sliding_attention one (the
    programs replace the model's mask by their own, which must keep the window)."""
    cfg = hf_config or {}
    cfg = cfg if "layer_types" in cfg else cfg.get("text_config") or {}
    kinds, window = cfg.get("layer_types") or [], cfg.get("sliding_window")
    for site in sites:
        layer = re.search(r"layers\.(\d+)\.", site.module + ".")
        if layer and int(layer.group(1)) < len(kinds) and kinds[int(layer.group(1))] == "sliding_attention":
            if window is None:
                raise MLAFXError(f"{site.module} is a sliding_attention layer, but the config has no sliding_window")
            site.window = int(window)
            if site.selection is not None:
                raise MLAFXError(f"{site.module} is both sparse (a top-k selects its keys) and a sliding-window "
                                 "layer; the inference programs keep one or the other, not both")


def _programs(gm: fx.GraphModule, config: AbsorbConfig | None, vocab_size: int, max_seq: int,
              hf_config: dict | None) -> InferencePrograms:
    analysis = analyze(gm)  # once, for both programs (the copy keeps the node names)
    _sliding_windows(analysis.sites, hf_config)
    unknown = [f"{s.attention}: {s.selection}" for s in analysis.sites if isinstance(s.selection, str)]
    if unknown:
        raise MLAFXError(f"{len(unknown)} attention(s) read only the keys a top-k selects (sparse attention), but not "
                         f"as DeepSeek-V3.2's lightning indexer does ({'; '.join(unknown[:2])}), so the inference "
                         "programs cannot cache what selects them. mla-fx absorb works on it (the full-sequence "
                         "program)")
    prefill, prefill_stats = run_passes(_copy(gm), pipelines.PREFILL, PassContext(analysis=analysis))
    result = absorb(gm, config, analysis=analysis)
    step, step_stats = run_passes(result.gm, pipelines.STEP, PassContext(result.mode, analysis))
    return InferencePrograms(step, prefill, result.sites, result.mode, vocab_size, max_seq,
                             {**result.pass_stats, **prefill_stats, **step_stats,
                              "crossover_tokens": [crossover_tokens(s.spec) for s in result.sites]})
