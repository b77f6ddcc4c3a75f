"""Cache size per token: expanded K/V vs HF transformers 5.x vs the mla-fx latent cache.

    python -m benchmarks.cache_size [--quick] [--out DIR]

For DeepSeek-V3, DeepSeek-V2, DeepSeek-V2-Lite and MiniCPM3 sizes a one-layer model (real attention
sizes, tiny MLP and vocab) is built and
- mla-fx: its step program is exported to ONNX and the width of the `past_latent.0` input is read
  off the graph (--quick: the width of `present_latent.0` that the prefill program returns);
- HF transformers: one forward with a DynamicCache, and the values per token it stores are counted;
- expanded K/V (per-head K and V, what a standard MHA cache holds): n_h (d_nope + d_r + d_v), a formula.
The formula value of the latent (d_c + d_r) is shown beside the measured one as a cross-check.
Bytes are for a bf16 cache (2 bytes per value); whole model = layers x 128k tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import (
    TINY_MLP,
    TINY_VOCAB,
    Report,
    build_hf,
    free_memory,
    loaded_model,
    pyplot,
    save_fig,
    setup_threads,
    standalone_main,
    step_onnx,
    v3_model_and_programs,
)

CONTEXT = 128 * 1024
BF16 = 2

# (name, layers in the real model, config class, attention sizes). DeepSeek-V3/V2/V2-Lite from their
# published configs; MiniCPM3-4B from transformers' MiniCPM3Config defaults (documented there as the
# openbmb/MiniCPM3-4B configuration).
MODELS = [
    ("DeepSeek-V3", 61, "DeepseekV3Config", None),  # the V3 model the decode benchmark uses
    ("DeepSeek-V2", 60, "DeepseekV2Config", dict(hidden_size=5120, num_attention_heads=128, q_lora_rank=1536,
                                                 kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                                 v_head_dim=128)),
    ("DeepSeek-V2-Lite", 27, "DeepseekV2Config", dict(hidden_size=2048, num_attention_heads=16, q_lora_rank=None,
                                                      kv_lora_rank=512, qk_nope_head_dim=128,
                                                      qk_rope_head_dim=64, v_head_dim=128)),
    ("MiniCPM3-4B", 62, "MiniCPM3Config", dict(hidden_size=2560, num_attention_heads=40, q_lora_rank=768,
                                               kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                               v_head_dim=64)),
]


def one_layer_config(cls_name: str, sizes: dict):
    import transformers

    kw = dict(sizes, num_key_value_heads=sizes["num_attention_heads"], num_hidden_layers=1,
              intermediate_size=TINY_MLP, vocab_size=TINY_VOCAB, max_position_embeddings=4096,
              tie_word_embeddings=False, pad_token_id=None, bos_token_id=0, eos_token_id=1)
    if cls_name == "DeepseekV2Config":
        kw.update(first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                  moe_intermediate_size=TINY_MLP)
    cfg = getattr(transformers, cls_name)(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def hf_values_per_token(model) -> int:
    """Values per token per layer that HF's own DynamicCache holds after a 5-token forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.zeros(1, 5, dtype=torch.int64)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    tensors = [t for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() for t in tensors) // 5


def latent_width(programs, quick: bool, key: str) -> tuple[int, str]:
    """Values per token per layer of the mla-fx cache, read off a graph."""
    if quick:
        ids, positions, mask = programs.prefill_example(batch=1, new=4)
        with torch.no_grad():
            out = programs.prefill(ids, positions, mask)
        return int(out[1].shape[-1]), "prefill program: present_latent.0"
    _, model = step_onnx(key, programs)
    inp = next(i for i in model.graph.input if i.name == "past_latent.0")
    return int(inp.type.tensor_type.shape.dim[-1].dim_value), "step.onnx input: past_latent.0"


def measure(name: str, layers: int, cls_name: str, sizes: dict | None, quick: bool) -> dict:
    from mla_fx.inference import build_programs

    if sizes is None:
        model, programs = v3_model_and_programs(128)
    else:
        model = build_hf(one_layer_config(cls_name, sizes))
        programs = build_programs(loaded_model(model, name))
    spec = programs.sites[0].spec
    key = "deepseek-v3-128h" if sizes is None else name
    measured, source = latent_width(programs, quick, key)
    values = spec.cache_values_per_token()
    hf = hf_values_per_token(model)
    row = {"model": name, "layers": layers, "heads": spec.n_heads, "d_c": spec.kv_lora_rank,
           "d_r": spec.qk_rope_head_dim, "expanded_kv_B": values["expanded_kv"] * BF16,
           "hf_transformers_B": hf * BF16, "mlafx_latent_B": measured * BF16,
           "latent_formula_B": (spec.kv_lora_rank + spec.qk_rope_head_dim) * BF16,
           "expanded_over_latent": values["expanded_kv"] / measured, "latent_source": source}
    for col, values_per_token in (("expanded_kv", values["expanded_kv"]), ("hf_transformers", hf),
                                  ("mlafx_latent", measured)):
        row[f"{col}_GiB_128k"] = values_per_token * BF16 * layers * CONTEXT / 2**30
    print(f"[cache] {name}: latent {measured} values/token/layer ({source}), HF {hf}, "
          f"expanded {values['expanded_kv']}", flush=True)
    del programs, model
    free_memory()
    return row


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.27
    series = [("expanded_kv_GiB_128k", "expanded K/V"), ("hf_transformers_GiB_128k", "HF transformers 5.x"),
              ("mlafx_latent_GiB_128k", "mla-fx latent")]
    for i, (key, label) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set(yscale="log", ylabel="GiB per sequence at 128k tokens (bf16)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_fig(fig, path, "KV cache of a whole model at 128k context")


def run(out: Path, quick: bool = False) -> Report:
    setup_threads()
    report = Report(out, "cache_size")
    rows = [measure(*m, quick=quick) for m in MODELS]
    cols = ["model", "layers", "heads", "d_c", "d_r", "expanded_kv_B", "hf_transformers_B", "mlafx_latent_B",
            "latent_formula_B", "expanded_over_latent", "expanded_kv_GiB_128k", "hf_transformers_GiB_128k",
            "mlafx_latent_GiB_128k"]
    report.add_table(
        "KV cache per token per layer (bytes, bf16) and per sequence at 128k tokens (GiB)", cols, rows,
        f"mla-fx latent: measured from {rows[0]['latent_source']} (one exported layer per model); latent_formula: "
        "d_c + d_r, the cross-check. HF transformers: counted in its DynamicCache after a forward (it stores the "
        "latent but re-expands K/V for every cached token at every step). expanded K/V: n_h (d_nope + d_r + d_v) "
        "per token, the formula (a standard MHA cache). FP8 latent: not built yet.")
    return report.finish(rows, plot)


def main(argv=None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
