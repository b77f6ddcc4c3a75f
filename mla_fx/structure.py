"""Structure without weights: a checkpoint's model built and captured with its weights on the meta device.

The HF class is built from config.json alone (as :mod:`mla_fx.transformers_loading` builds it: SDPA, batched
experts) with every parameter on meta, so a 671B model costs nothing to build or capture. Buffers that a
checkpoint does not hold (non-persistent: RoPE's `inv_freq`) are computed by the model's own constructor on
the CPU and kept with their values; the rest of the graph only needs shapes and dtypes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from mla_fx.checkpoint import Checkpoint
from mla_fx.errors import LoadError, require
from mla_fx.models.wrappers import CausalLMLogits
from mla_fx.passes.capture import capture
from mla_fx.weight_recipes import mark_source

EXAMPLE_SHAPE = (2, 9)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers is created on the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@dataclass
class Structure:
    """A model's captured graph over meta weights, with what the weights alone do not say."""

    graph: fx.GraphModule  # as captured, before any pass (meta parameters, recipes marked)
    buffers: dict[str, torch.Tensor]  # non-persistent buffers by graph name, with their real values
    vocab_size: int
    max_seq: int
    dtype: torch.dtype
    note: str | None = None
    # what transformers looks the checkpoint's renamings and converters up by: each sub-model's class, then its
    # model_type (Dots3NoteTextModel holds dots3_note's expert fusing, A.X-K2's model_type its renamings)
    conversion_keys: tuple[str, ...] = ()
    hf_config: dict | None = None  # the (text) config as transformers completes it (derived layer_types, ...)
    positions: bool = False  # captured as (input_ids, position_ids) -> logits

    def example(self) -> tuple[torch.Tensor, ...]:
        ids = torch.zeros(EXAMPLE_SHAPE, dtype=torch.long, device="meta")
        return (ids, ids.clone()) if self.positions else (ids,)

    def fresh_graph(self) -> fx.GraphModule:
        """A copy the passes may rewrite (meta weights make the copy free); recipes stay marked."""
        gm = copy.deepcopy(self.graph)
        _mark(gm)
        return gm

    def checkpoint_key(self, name: str, checkpoint: Checkpoint) -> str:
        """The checkpoint key a graph parameter is loaded from (the wrapper's `model.` prefix dropped)."""
        return checkpoint.resolve(name.removeprefix("model."))


def run_on_cpu(graph: fx.Graph) -> None:
    """A graph captured on meta creates tensors on meta (arange, zeros, ...): make them on the CPU."""
    meta = torch.device("meta")
    for node in graph.nodes:
        if node.kwargs.get("device") in (meta, "meta"):
            node.kwargs = {**node.kwargs, "device": torch.device("cpu")}
        if any(a == meta for a in node.args if isinstance(a, torch.device)):
            node.args = tuple(torch.device("cpu") if isinstance(a, torch.device) and a == meta else a
                              for a in node.args)


def _mark(gm: fx.GraphModule) -> None:
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        mark_source(tensor, name)


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None:
                found[f"{prefix}.{name}" if prefix else name] = buffer.detach().clone()
    return found


def capture_structure(checkpoint: Checkpoint, dtype: torch.dtype | None = None, positions: bool = False) -> Structure:
    """Build the checkpoint's causal LM with meta weights and capture it (ids -> logits, or (ids, positions) ->
    logits as the inference programs need) in `dtype` (default: the checkpoint's compute dtype)."""
    from mla_fx import transformers_loading

    tf = require("transformers", "hf", "Reading a HF checkpoint")
    dtype = dtype or checkpoint.dtype
    try:
        config = tf.AutoConfig.from_pretrained(checkpoint.directory, local_files_only=True)
    except Exception as e:
        raise LoadError(f"{checkpoint.directory}: transformers cannot read config.json: {e}") from e
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the structure is built unquantized; FP8 weights are read by mla-fx
    with parameters_on_meta():  # built in `dtype` as from_pretrained builds it: float32 buffers stay float32
        model, choice = transformers_loading.from_config(config, dtype)
    wrapper = CausalLMLogits(model).eval()
    buffers = _non_persistent_buffers(wrapper)
    wrapper.to("meta")
    cfg = choice.text_config
    max_seq = getattr(cfg, "max_position_embeddings", None) or 4096
    structure = Structure(None, buffers, int(cfg.vocab_size), int(max_seq), dtype,
                          transformers_loading.text_decoder_note(choice), transformers_loading.conversion_keys(model),
                          cfg.to_dict(), positions)
    structure.graph = capture(wrapper, structure.example(), max_seq=max_seq)
    _mark(structure.graph)
    return structure
