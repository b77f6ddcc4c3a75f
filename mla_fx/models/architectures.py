"""Every MLA architecture in the installed transformers, built tiny as it really is.

`mla_architectures()` finds them by their configs (a config with `kv_lora_rank`), so an architecture
that transformers adds is found without code here. `tiny_config(arch)` shrinks the architecture's own
default config: the sizes below wherever the config has them, and one layer of each kind it mixes
(attention kinds such as linear, sliding or indexed attention; dense and MoE feed-forwards), with the
per-layer overrides it has kept on a layer of the tiny model. Nothing else changes, so MoE stays on,
DSA keeps its indexer and hybrids keep their other layers. `tiny_checkpoint_config(arch)` is what a checkpoint
holds: that config, or for a text decoder transformers has no class for alone, its multimodal config.
"""

from __future__ import annotations

import copy
import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from mla_fx.errors import require

# Tiny sizes, set on every config field of these names that the architecture's config has.
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, ffn_hidden_size=96, moe_intermediate_size=32,
    expert_ffn_hidden_size=32, shared_experts_intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
    kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=4, num_experts=4, num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2,
    n_shared_experts=1, num_shared_experts=1, n_group=1, num_expert_group=1, topk_group=1, zero_expert_num=1,
    max_position_embeddings=256, model_max_length=256, index_topk=8, index_head_dim=16, index_n_heads=16,
    linear_head_dim=16, linear_num_heads=4, sliding_window=8, num_nextn_predict_layers=0, gated_norm_rank=4,
    index_kpool=2, layer_group_size=2,
)
# Per-layer overrides (dots3_note) shrink to these: other ranks than the model-wide ones, as in the model.
TINY_PER_LAYER = dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=24,
                      q_lora_rank=32, v_head_dim=8, qk_rope_head_dim=8)
ROPE_ORIGINAL_MAX = 64  # YaRN's original context, below the tiny max_position_embeddings


@dataclass(frozen=True)
class Architecture:
    folder: str  # transformers.models.<folder>
    config_class: type  # the config that has kv_lora_rank (a multimodal model's text config)

    @property
    def name(self) -> str:
        return self.folder


def _transformers():
    return require("transformers", "hf", "Building transformers' MLA architectures")


def _configs_of(folder: str) -> list[type]:
    tf = _transformers()
    try:
        module = importlib.import_module(f"transformers.models.{folder}.configuration_{folder}")
    except ImportError:
        return []
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, tf.PretrainedConfig) and obj.__module__ == module.__name__]


@functools.cache
def mla_architectures() -> tuple[Architecture, ...]:
    """The architectures of the installed transformers whose (text) config has kv_lora_rank, by folder
    (every config class of transformers is built once with its defaults to look: a few seconds)."""
    tf = _transformers()
    found = []
    for info in pkgutil.iter_modules(tf.models.__path__):
        configs = _configs_of(info.name)
        mla = [c for c in configs if "kv_lora_rank" in _defaults(c)]
        if not mla:
            continue
        found.append(Architecture(info.name, mla[0]))
    return tuple(found)


def _defaults(cls: type) -> dict[str, Any]:
    try:
        return cls().to_dict()
    except Exception:  # a config that cannot be built with its defaults is not one we can shrink
        return {}


def _distinct(values: list) -> list:
    return list(dict.fromkeys(values))


def tiny_config(arch: Architecture):
    """The architecture's default config at tiny sizes, one layer of each kind it mixes."""
    default = arch.config_class()
    d = default.to_dict()
    kw: dict[str, Any] = {}
    for key, value in TINY.items():
        no_part = key in ("q_lora_rank", "qk_rope_head_dim") and not d.get(key)  # no q_lora, no decoupled RoPE
        if key in d and not no_part:
            kw[key] = value
    rope = kw.get("qk_rope_head_dim", d.get("qk_rope_head_dim"))
    if "head_dim" in d:
        kw["head_dim"] = _tiny_head_dim(d, kw, rope)
    if "qk_head_dim" in d:
        kw["qk_head_dim"] = kw.get("qk_nope_head_dim", d.get("qk_nope_head_dim", 0)) + (rope or 0)
    kinds = _distinct(d.get("layer_types") or [])
    mlp_kinds = _distinct(d.get("mlp_layer_types") or [])
    n_layers = max(2, len(kinds), len(mlp_kinds))
    if "num_layers" in d and "num_hidden_layers" not in d:  # LongcatFlash: each layer holds two MLA sublayers
        kw["num_layers"] = 1
    else:
        kw["num_hidden_layers"] = n_layers
    if kinds:
        kw["layer_types"] = (kinds * n_layers)[:n_layers]
    if mlp_kinds:  # the first layer dense, as in the models, then MoE
        kw["mlp_layer_types"] = (["dense"] + ["sparse"] * n_layers)[:n_layers] if "dense" in mlp_kinds else \
            (mlp_kinds * n_layers)[:n_layers]
    if "first_k_dense_replace" in d:
        kw["first_k_dense_replace"] = 1
    if d.get("indexer_types"):  # the first indexer computes its own top-k; later ones may share it
        others = [k for k in _distinct(d["indexer_types"]) if k != "full"] or ["full"]
        kw["indexer_types"] = (["full"] + others * n_layers)[:n_layers]
    if d.get("per_layer_config"):
        kw["per_layer_config"] = _tiny_per_layer(d["per_layer_config"], kw.get("layer_types"), d.get("layer_types"))
    if isinstance(d.get("rope_parameters"), dict):
        kw["rope_parameters"] = _tiny_rope(d["rope_parameters"])
    if "rope_theta" in d and isinstance(d.get("rope_parameters"), dict) and "rope_theta" in d["rope_parameters"]:
        kw["rope_theta"] = d["rope_parameters"]["rope_theta"]
    kw.update(bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)
    config = arch.config_class(**kw)
    config.architectures = named_architectures(arch)
    return config


# sizes for a multimodal model's other sub-models (vision, audio): one tiny layer
TINY_TOWER = dict(TINY, num_hidden_layers=1, depth=1, num_layers=1, embed_dim=64, head_dim=16, out_hidden_size=64,
                  projection_intermediate_size=96)


def tiny_checkpoint_config(arch: Architecture):
    """What a checkpoint of the architecture holds, tiny: its (text) config, or where transformers has no class
    for the text decoder alone (GLM-5-Next, Mistral Large 3, HY-V4-VL), the multimodal config around it with the
    other sub-models shrunk to one tiny layer (their outputs never reach a text-only forward)."""
    from mla_fx.errors import LoadError
    from mla_fx.transformers_loading import choose_class

    text = tiny_config(arch)
    try:
        choice = choose_class(text)
    except LoadError:
        choice = None
    outer = [c for c in _configs_of(arch.folder) if "text_config" in _defaults(c)]
    if choice is not None or not outer:
        return text
    d = outer[0]().to_dict()
    for key, sub in d.items():
        if isinstance(sub, dict) and "model_type" in sub:
            d[key] = {k: TINY_TOWER.get(k, v) for k, v in sub.items()}
    d["text_config"] = text.to_dict()
    return outer[0](**d)


def named_architectures(arch: Architecture) -> list[str] | None:
    """What a checkpoint's config.json names: the folder's causal LM; where the folder has no model code
    (sarvam_mla), the DeepSeek-V3 class its released checkpoints name."""
    try:
        module = importlib.import_module(f"transformers.models.{arch.folder}.modeling_{arch.folder}")
    except ImportError:
        return ["DeepseekV3ForCausalLM"]
    causal = [n for n, obj in vars(module).items() if n.endswith("ForCausalLM") and isinstance(obj, type)
              and getattr(obj, "config_class", None) is arch.config_class]
    return causal[:1] or None


def _tiny_head_dim(d: dict, kw: dict, rope: int | None) -> int:
    """head_dim means different things: the rotary dim (DeepSeek style), q/k's full width (nope + rope, as
    sliding-window layers use it, possibly with per-layer nope), or another attention's head dim."""
    nope, rope_default = d.get("qk_nope_head_dim"), d.get("qk_rope_head_dim")
    if d["head_dim"] == 0:
        return 0
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    partial = [v.get("partial_rotary_factor") for v in params.values() if isinstance(v, dict)] + \
        [params.get("partial_rotary_factor")]
    for factor in filter(None, partial):  # the rotary embedding takes head_dim * partial_rotary_factor
        if rope_default and d["head_dim"] * factor == rope_default:
            return int(rope / factor)
    if d["head_dim"] == rope_default:
        return rope
    if nope is not None and d["head_dim"] == nope + (rope_default or 0):
        return kw.get("qk_nope_head_dim", nope) + (rope or 0)
    for layer in (d.get("per_layer_config") or {}).values():
        if "qk_nope_head_dim" in layer and d["head_dim"] == layer["qk_nope_head_dim"] + (rope_default or 0):
            return TINY_PER_LAYER["qk_nope_head_dim"] + (rope or 0)
    return 16


def _tiny_per_layer(per_layer: dict, tiny_kinds: list | None, kinds: list | None) -> dict:
    """The overrides of the first overridden layer, shrunk, on the tiny layer of the same kind."""
    first = min(per_layer, key=int)
    target = 1
    if tiny_kinds and kinds:
        kind = kinds[int(first)]
        target = tiny_kinds.index(kind) if kind in tiny_kinds else target
    shrunk = {k: TINY_PER_LAYER.get(k, v) for k, v in per_layer[first].items()}
    return {f"{target:02d}": shrunk}


def _tiny_rope(rope: dict) -> dict:
    if all(isinstance(v, dict) for v in rope.values()):  # per layer kind
        return {kind: _tiny_rope(params) for kind, params in rope.items()}
    rope = copy.deepcopy(rope)
    if "original_max_position_embeddings" in rope:
        rope["original_max_position_embeddings"] = ROPE_ORIGINAL_MAX
    if "max_position_embeddings" in rope:
        rope["max_position_embeddings"] = TINY["max_position_embeddings"]
    if "mrope_section" in rope:  # multimodal RoPE: (time, height, width) sections summing to d_r / 2
        half = TINY["qk_rope_head_dim"] // 2
        rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]
    return rope
