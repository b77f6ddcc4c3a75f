"""Tiny, randomly initialised HF transformers MLA models (the zoo the passes are tested on).

Every builder returns a :class:`~mla_fx.models.wrappers.CausalLMLogits` in eval mode, built as
mla-fx loads a checkpoint (:mod:`mla_fx.transformers_loading`: SDPA attention, ``batched_mm``
experts): hidden 64, 4 heads (= KV heads), vocab 128, kv_lora_rank 32, q_lora_rank 48, qk_nope 16,
qk_rope 8, v_head_dim 12 (v differs from nope on purpose). As in the real models, the MoE models
have a dense first layer and a mixture-of-experts second layer (4 routed experts, top 2, one shared
expert). Weights are re-drawn with a large std so attention is far from uniform (HF's
0.02 init makes softmax nearly flat and hides numerical bugs); norm weights stay near 1.

transformers is imported lazily (optional extra ``mla-fx[hf]``).
"""

from __future__ import annotations

import torch
from torch import nn

from mla_fx.errors import require
from mla_fx.models.wrappers import CausalLMLogits

ZOO_NAMES: tuple[str, ...] = (
    "deepseek_v3",
    "deepseek_v3_rotate_half",
    "deepseek_v3_yarn",
    "deepseek_v3_no_q_lora",
    "deepseek_v2",
    "minicpm3",
    "glm4_moe_lite",
    "longcat_flash",
)

# Shared tiny sizes.
HIDDEN = 64
LAYERS = 2
HEADS = 4
VOCAB = 128
INTERMEDIATE = 96
KV_LORA = 32
Q_LORA = 48
QK_NOPE = 16
QK_ROPE = 8
V_HEAD = 12
MAX_POS = 256
ROPE_THETA = 10000.0

WEIGHT_STD = 0.2  # re-init std for every non-norm parameter
NORM_JITTER = 0.1  # norm weights are 1 + NORM_JITTER * randn

# YaRN settings for "deepseek_v3_yarn". mscale != mscale_all_dim, so both the cos/sin factor
# get_mscale(f, mscale) / get_mscale(f, mscale_all_dim) != 1 and the softmax scale
# (d_nope+d_r)^-0.5 * get_mscale(f, mscale_all_dim)^2 != (d_nope+d_r)^-0.5 are exercised.
YARN = {
    "rope_type": "yarn",
    "rope_theta": ROPE_THETA,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
}


# The MoE sizes of the DeepSeek-style zoo configs; layer 0 is dense, layer 1 a mixture of experts.
SMALL_MOE = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32)
DENSE_LAYERS = 1


def _transformers():
    return require("transformers", "hf", "Building HF zoo models")


def _mla_sizes() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        kv_lora_rank=KV_LORA,
        q_lora_rank=Q_LORA,
        qk_nope_head_dim=QK_NOPE,
        qk_rope_head_dim=QK_ROPE,
        v_head_dim=V_HEAD,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=1,
    )


def _default_rope() -> dict:
    return {"rope_type": "default", "rope_theta": ROPE_THETA}


def hf_config(name: str):
    """The tiny transformers config that :func:`build` uses for ``name``."""
    tf = _transformers()
    base = _mla_sizes()
    if name.startswith("deepseek_v3"):
        kw = dict(
            base,
            num_hidden_layers=LAYERS,
            first_k_dense_replace=DENSE_LAYERS,
            **SMALL_MOE,
            n_group=1,
            topk_group=1,
            rope_interleave=True,
            rope_parameters=_default_rope(),
        )
        if name == "deepseek_v3":
            pass
        elif name == "deepseek_v3_rotate_half":
            kw["rope_interleave"] = False
        elif name == "deepseek_v3_yarn":
            kw["rope_parameters"] = dict(YARN)
        elif name == "deepseek_v3_no_q_lora":
            kw["q_lora_rank"] = None
        else:
            raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_NAMES)}")
        cfg = tf.DeepseekV3Config(**kw)
    elif name == "deepseek_v2":
        cfg = tf.DeepseekV2Config(
            **base,
            num_hidden_layers=LAYERS,
            first_k_dense_replace=DENSE_LAYERS,
            **SMALL_MOE,
            rope_parameters=_default_rope(),
        )
    elif name == "minicpm3":
        cfg = tf.MiniCPM3Config(
            **base,
            num_hidden_layers=LAYERS,
            rope_parameters=_default_rope(),
            scale_emb=2.0,  # embeddings * scale_emb
            scale_depth=1.4,  # residual branches * scale_depth / sqrt(L)
            dim_model_base=32,  # hidden / (hidden / dim_model_base) before lm_head
        )
    elif name == "glm4_moe_lite":
        cfg = tf.Glm4MoeLiteConfig(
            **base,
            num_hidden_layers=LAYERS,
            mlp_layer_types=["dense"] * DENSE_LAYERS + ["sparse"] * (LAYERS - DENSE_LAYERS),
            **SMALL_MOE,
            rope_interleave=True,
            rope_parameters=_default_rope(),
        )
    elif name == "longcat_flash":
        kw = dict(base)
        kw.pop("intermediate_size")
        # One LongcatFlash decoder layer holds two MLA sublayers (num_hidden_layers = 2 * num_layers).
        # Its shortcut MoE is always present; with moe_topk=0 it selects no expert and adds zeros
        # (the data-dependent expert loop is skipped, so torch.export traces it).
        cfg = tf.LongcatFlashConfig(
            **kw,
            num_layers=1,
            ffn_hidden_size=INTERMEDIATE,
            head_dim=QK_ROPE,  # the rotary embedding's dim
            n_routed_experts=0,
            zero_expert_num=1,
            moe_topk=0,
            expert_ffn_hidden_size=32,
            routed_scaling_factor=1.0,
            rope_parameters=_default_rope(),
        )
    else:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_NAMES)}")
    return cfg


def _randomise(model: nn.Module, seed: int) -> None:
    """Re-draw all parameters: N(0, WEIGHT_STD), norm weights 1 + NORM_JITTER * N(0, 1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in norm_params:
                p.copy_(1.0 + NORM_JITTER * noise)
            else:
                p.copy_(WEIGHT_STD * noise)


def _finish(model: nn.Module, seed: int, dtype: torch.dtype) -> CausalLMLogits:
    _randomise(model, seed)
    return CausalLMLogits(model.to(dtype).eval()).eval()


def build(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> CausalLMLogits:
    """A tiny random HF MLA model ``name`` (one of ZOO_NAMES), wrapped as input_ids -> logits."""
    if name not in ZOO_NAMES:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_NAMES)}")
    return build_config(hf_config(name), seed, dtype)


def build_config(cfg, seed: int = 0, dtype: torch.dtype = torch.float32) -> CausalLMLogits:
    """A model from a transformers config, built as mla-fx loads one, with the zoo's random weights."""
    from mla_fx.transformers_loading import from_config

    torch.manual_seed(seed)
    model, _ = from_config(cfg)
    return _finish(model, seed, dtype)


def tiny_llama(*, seed: int = 0) -> CausalLMLogits:
    """A tiny Llama (plain GQA attention, no MLA) for "no MLA found" tests."""
    tf = _transformers()
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        tie_word_embeddings=False,
    )
    return build_config(cfg, seed, torch.float32)


FP8_SKIP = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "e_score_correction_bias")


def save_checkpoint(name: str, directory, *, dtype: torch.dtype = torch.float32, fp8_block: int | None = None,
                    seed: int = 0) -> None:
    """A zoo model saved as a HF checkpoint directory, as `save_pretrained` writes it (hub key format, experts one
    by one). With `fp8_block`, in DeepSeek-V3's FP8 format: the linear weights (not embeddings, norms, routers or
    lm_head) as float8_e4m3fn with a float32 `weight_scale_inv` per fp8_block x fp8_block block."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from mla_fx.checkpoint import quantize_blocks

    directory = Path(directory)
    build(name, seed=seed, dtype=dtype).model.save_pretrained(directory)
    if fp8_block is None:
        return
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(shard))
        out = {}
        for key, value in tensors.items():
            if value.dim() == 2 and key.endswith(".weight") and not any(s in key for s in FP8_SKIP):
                out[key], out[key + "_scale_inv"] = quantize_blocks(value, (fp8_block, fp8_block))
            else:
                out[key] = value
        save_file(out, str(shard), metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        for key, shard in list(data["weight_map"].items()):
            data["weight_map"][key + "_scale_inv"] = shard
        index.write_text(json.dumps(data, indent=2))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [fp8_block, fp8_block]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
