"""Building and loading HF transformers models the way mla-fx can capture and check them.

- The class is the one config.json names (`architectures`); the auto mapping is only a fallback
  (Mistral 4's config names a class that AutoModelForCausalLM does not map).
- Attention goes through SDPA (the op the passes match); a model that refuses SDPA runs eager.
- Experts run as `batched_mm`: the expert weights are gathered per (token, expert) pair and applied
  by batched matmuls. It has no data-dependent shapes (torch.export captures it), runs in float64
  (transformers' default `grouped_mm` rejects it) and exports to ONNX with standard ops (Gather,
  MatMul); it needs no custom op, so an absorbed `.pt2` loads with `import mla_fx` alone.
- A multimodal checkpoint whose text decoder is MLA is loaded as that text decoder alone.
- An FP8 checkpoint (DeepSeek-V3 format) is dequantized by mla-fx (:mod:`mla_fx.checkpoint`) and handed to
  transformers as a state dict: transformers 5.24's CPU dequantization derives the block from the scale grid and
  refuses weights whose rows are not a multiple of it (DeepSeek-V3's 576-row kv_a_proj_with_mqa, 128 blocks).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mla_fx.errors import LoadError, require

ATTENTION = ("sdpa", "eager")  # preference order
EXPERTS = "batched_mm"


def _transformers():
    return require("transformers", "hf", "Loading a HF transformers model")


@dataclass(frozen=True)
class ModelChoice:
    """Which class builds the causal LM, and whether it is the text decoder of a multimodal model."""

    cls: type
    config: Any  # the (text) config the class is built from
    multimodal_cls: type | None = None  # the multimodal class config.json names, when its text decoder is used
    text_only: bool = False  # cls is multimodal (transformers has no class for its text decoder alone), run on text

    @property
    def text_config(self):
        return self.config.get_text_config(decoder=True) if self.text_only else self.config


def _is_causal_lm(cls: type) -> bool:
    return "CausalLM" in cls.__name__


def _text_causal_lm(tf, config) -> type | None:
    try:
        return tf.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def _auto_class(tf, config) -> type | None:
    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        mapping = getattr(tf, auto, None)
        if mapping is not None and type(config) in mapping._model_mapping:
            return mapping._model_mapping[type(config)]
    return None


def choose_class(config) -> ModelChoice:
    """The causal-LM class for `config`: what `architectures` names, else the auto mapping; for a
    multimodal config, the causal LM of its text config, or where transformers has none, the multimodal class
    itself run on text alone (its forward takes input_ids without images; the vision tower is never called)."""
    tf = _transformers()
    named = [getattr(tf, a, None) for a in (getattr(config, "architectures", None) or [])]
    for cls in named:
        if cls is not None and _is_causal_lm(cls):
            return ModelChoice(cls, config)
    cls = _text_causal_lm(tf, config)
    if cls is not None and _is_causal_lm(cls):
        return ModelChoice(cls, config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        cls = _text_causal_lm(tf, text)
        if cls is not None:
            outer = next((c for c in named if c is not None), None) or _auto_class(tf, config)
            if outer is not None:
                return ModelChoice(cls, text, multimodal_cls=outer)
        outer = next((c for c in named if c is not None), None) or _auto_class(tf, config)
        if outer is not None and "kv_lora_rank" in text.to_dict():
            return ModelChoice(outer, config, text_only=True)
    raise LoadError(f"no causal-LM class for model_type {getattr(config, 'model_type', None)!r}: config.json "
                    f"names {getattr(config, 'architectures', None)}, and transformers maps "
                    f"{type(config).__name__} to no causal LM and has no MLA text decoder in it")


def _with_attention(build, cls: type):
    """Run `build(attn_implementation)` with SDPA, or eager where the class refuses SDPA."""
    for impl in ATTENTION:
        if impl == "sdpa" and not getattr(cls, "_supports_sdpa", False):
            continue
        return build(impl)
    raise LoadError(f"{cls.__name__} supports none of the attention implementations {ATTENTION}")


def from_config(config, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ModelChoice]:
    """A model with random weights from a transformers config, its parameters in `dtype`; buffers the model makes
    in float32 (RoPE's `inv_freq`) stay float32, as `from_pretrained(dtype=...)` leaves them."""
    choice = choose_class(config)
    model = _with_attention(lambda impl: choice.cls._from_config(
        choice.config, attn_implementation=impl, experts_implementation=EXPERTS, dtype=dtype), choice.cls)
    return model.eval(), choice


def from_pretrained(path: Path, dtype: torch.dtype = torch.float32
                    ) -> tuple[nn.Module, ModelChoice, dict[str, list[str]]]:
    """A model directory's causal LM (or multimodal text decoder) and transformers' loading info."""
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    choice = choose_class(config)
    cls = choice.multimodal_cls or choice.cls
    source: dict[str, Any] = {"pretrained_model_name_or_path": path, "local_files_only": True}
    if _quant_method(config) == "fp8":
        del config.quantization_config
        source = {"pretrained_model_name_or_path": None, "config": config,
                  "state_dict": _dequantized_state_dict(path, dtype)}
    model, info = _with_attention(lambda impl: cls.from_pretrained(
        **source, attn_implementation=impl, experts_implementation=EXPERTS, dtype=dtype,
        output_loading_info=True), cls)
    if choice.multimodal_cls is not None:
        model = _text_decoder(model, choice)
    return model.eval(), choice, info


def _quant_method(config) -> str | None:
    q = getattr(config, "quantization_config", None)
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) if q else None


def _dequantized_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 checkpoint with its FP8 weights dequantized to `dtype` (their scales dropped)."""
    from mla_fx.checkpoint import FP8_DTYPES, Checkpoint

    ckpt = Checkpoint(path)
    fp8 = {k for k in ckpt.keys() if ckpt.raw_dtype(k) in FP8_DTYPES}
    scales = {ckpt.scale_key(k) for k in fp8}
    return {k: ckpt.tensor(k, dtype if k in fp8 else None) for k in ckpt.keys() if k not in scales}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' load report and progress bars off (a folder whose missing and extra keys are expected)."""
    tf = _transformers()
    level, bars = tf.logging.get_verbosity(), tf.utils.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.logging.set_verbosity(level)
        if bars:  # enabling them where they were off warns (HF_HUB_DISABLE_PROGRESS_BARS)
            tf.utils.logging.enable_progress_bar()


def _text_decoder(multimodal: nn.Module, choice: ModelChoice) -> nn.Module:
    """The causal LM of a multimodal model's text decoder, sharing its modules (no weight is copied)."""
    with torch.device("meta"):
        lm = choice.cls._from_config(choice.config, attn_implementation=multimodal.config._attn_implementation,
                                     experts_implementation=EXPERTS)
    lm.model = multimodal.get_decoder()
    lm.lm_head = multimodal.get_output_embeddings()
    return lm


def text_decoder_note(choice: ModelChoice) -> str | None:
    if choice.text_only:
        return (f"{choice.cls.__name__} is multimodal and transformers has no class for its MLA text decoder alone: "
                "it runs on text (no image inputs), so its vision tower is in no program")
    if choice.multimodal_cls is None:
        return None
    return (f"{choice.multimodal_cls.__name__} is multimodal: its MLA text decoder ({choice.cls.__name__}) is absorbed "
            "and exported; the vision tower is left out")


def conversion_keys(model: nn.Module) -> tuple[str, ...]:
    """What transformers looks a model's checkpoint conversions up by: each sub-model's class name, then its
    model_type, outermost first."""
    tf = require("transformers", "hf", "Reading a HF checkpoint")
    keys = [k for m in model.modules() if isinstance(m, tf.PreTrainedModel)
            for k in (type(m).__name__, m.config.model_type)]
    return tuple(dict.fromkeys(keys))


@functools.cache
def _conversions(keys: tuple[str, ...]) -> tuple:
    """The checkpoint renamings and converters registered for any of `keys` (transformers deep-copies them on every
    call, so they are read once)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return tuple(c for key in keys for c in get_checkpoint_conversion_mapping(key) or [])


class FusedParameter(NamedTuple):
    """A parameter transformers fuses at load time: `parts` yields its `count` slices along dim 0, in order."""

    count: int
    parts: Iterator[torch.Tensor]


def fused_parameter(conversion_keys: tuple[str, ...], module_key: str, keys: list[str],
                    read: Callable[[str], torch.Tensor]) -> FusedParameter | None:
    """A parameter transformers fuses from several checkpoint tensors at load time (MoE experts stored one by one
    become one [experts, ...] parameter), made by transformers' own conversion ops from the tensors `read(key)`
    gives, in parts along its first dimension (one expert at a time: DeepSeek-V3's fused experts would be 15 GB at
    once; nothing is read before the parts are). None where no conversion of the model type targets
    `module_key`."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter

    tail = module_key[module_key.find("layers."):] if "layers." in module_key else module_key
    for converter in _conversions(conversion_keys):
        if not isinstance(converter, WeightConverter) or len(converter.target_patterns) != 1:
            continue
        (target,) = converter.target_patterns
        if not tail.endswith(target):
            continue
        if not isinstance(converter.operations[0], MergeModulelist) or converter.operations[0].dim != 0:
            raise LoadError(f"{module_key}: transformers builds it by {converter.operations}, which mla-fx does not "
                            "read in parts")
        prefix = re.escape(tail[: len(tail) - len(target)])
        found = {}
        for pattern in converter.source_patterns:
            regex = re.compile(r"(?:^|.*\.)" + prefix + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
            found[pattern] = dict(sorted((int(m.group(1)), k) for k in keys if (m := regex.match(k))))
        experts = sorted(next(iter(found.values())))
        if not experts or any(sorted(f) != experts for f in found.values()):
            raise LoadError(f"{module_key}: the checkpoint does not hold the same experts for each of "
                            f"{converter.source_patterns}")

        def parts(converter=converter, target=target, found=found, experts=experts) -> Iterator[torch.Tensor]:
            for j in experts:
                data = {pattern: [read(found[pattern][j])] for pattern in converter.source_patterns}
                for op in converter.operations:
                    data = op.convert(data, source_patterns=list(converter.source_patterns),
                                      target_patterns=[target], full_layer_name=module_key)
                (value,) = data.values()
                yield value

        return FusedParameter(len(experts), parts())
    return None


def _renamings(conversion_keys: tuple[str, ...]) -> list[tuple[str, str, bool]]:
    """(source, target, plain) of every renaming transformers applies at load time; plain: both are text (a literal
    written as a regex, A.X-K2's `self_attn\\.q_b_proj\\.`, read as text), so a name can be followed back."""
    from transformers.core_model_loading import WeightConverter

    text = re.compile(r"^[\w.]+$")
    return [(source.replace("\\.", "."), target, bool(text.match(source.replace("\\.", ".")) and text.match(target)))
            for renaming in _conversions(conversion_keys) if not isinstance(renaming, WeightConverter)
            for source, target in zip(renaming.source_patterns, renaming.target_patterns, strict=False)]


def unfollowed_renamings(conversion_keys: tuple[str, ...]) -> list[str]:
    """The renamings :func:`stored_names` cannot follow back (regular expressions: a checkpoint in its maker's own
    format, such as Mistral's consolidated names)."""
    return [f"{source} -> {target}" for source, target, plain in _renamings(conversion_keys) if not plain]


def stored_names(conversion_keys: tuple[str, ...], module_key: str) -> list[str]:
    """The names a checkpoint may store a module parameter under, by the model type's renamings (transformers
    renames at load time: A.X-K1 stores `layers.N.post_mlp_layernorm` for the module's
    `layers.N.mlp.post_mlp_layernorm`); plain-text renamings only, the module's own name first."""
    return [module_key] + [module_key.replace(target, source) for source, target, plain in _renamings(conversion_keys)
                           if plain and target in module_key]
