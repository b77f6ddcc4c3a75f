"""Decode step on CPU: one MLA layer at DeepSeek-V3 attention sizes, HF transformers vs mla-fx.

    python -m benchmarks.decode_cpu [--quick] [--out DIR]

For each head count (128, and a 32-head tensor-parallel shard), batch (1, 8) and cache length
(1k, 4k, 16k tokens), one new token is decoded over T cached tokens by
- HF transformers DeepseekV3 (1-layer model) with its own DynamicCache prefilled with the same latent
  rows, attention "eager" and "sdpa" (it caches the latent and re-expands K/V every step);
- the rewritten PyTorch step program (mla_fx.inference.build_programs on the same weights);
- ONNX Runtime on the exported step.onnx.
All back-ends get the same inputs; their logits are compared (max relative difference to HF sdpa).
fp32, 2 threads, median of repeats after a warm-up. Each time is also set against the roofline floor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import roofline
from .common import (
    Report,
    free_memory,
    ort_session,
    param_bytes,
    peak_rss_bytes,
    pyplot,
    reset_peak_rss,
    rss_bytes,
    save_fig,
    setup_threads,
    standalone_main,
    step_onnx,
    time_call,
    v3_model_and_programs,
)

MEMORY_LIMIT = 12e9  # bytes of temporaries one step may allocate before the config is skipped
BACKENDS = ("hf_eager", "hf_sdpa", "mlafx_torch", "mlafx_ort")
LABELS = {"hf_eager": "HF eager", "hf_sdpa": "HF sdpa", "mlafx_torch": "mla-fx torch", "mlafx_ort": "mla-fx ORT"}


def grid(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(heads, batches, cache lengths)."""
    return ((128,), (1,), (1024, 4096)) if quick else ((128, 32), (1, 8), (1024, 4096, 16384))


def hf_step_bytes(spec, batch: int, tokens: int) -> int:
    """fp32 temporaries HF allocates per step: kv_b_proj output, the key tensor, a contiguous value copy."""
    h, dn, dr, dv = spec.n_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
    return 4 * batch * tokens * h * ((dn + dv) + (dn + dr) + dv)


def latent_op_expands(d_c: int = 512, d_r: int = 64) -> bool:
    """Does mla_fx::latent_attention on CPU copy the shared latent once per head when batch > 1?

    torch.matmul broadcasting [B,H,S,d] @ [B,1,d,T] materialises the latent for every head (B*H*T*d_c
    values) unless B == 1. Probed, not assumed, so a fixed op is measured in full: the peak memory
    of one small call is compared with that copy's size.
    """
    from mla_fx import ops  # noqa: F401  (registers the op)

    b, h, t = 2, 32, 2048
    q, q_rope = torch.randn(b, h, 1, d_c), torch.randn(b, h, 1, d_r)
    kv, mask = torch.randn(b, t, d_c + d_r), torch.ones(b, 1, 1, t, dtype=torch.bool)
    base = rss_bytes()
    if not reset_peak_rss():
        return True  # cannot tell: be safe
    torch.ops.mla_fx.latent_attention(q, q_rope, kv, mask, 0.1, False)
    return peak_rss_bytes() - base > 0.5 * 4 * b * h * t * d_c


def torch_step_bytes(spec, batch: int, tokens: int, expands: bool) -> int:
    """fp32 temporaries of the rewritten step: the latent copied per head when the op expands it."""
    return 4 * batch * spec.n_heads * tokens * spec.kv_lora_rank if expands and batch > 1 else 0


def step_cost(spec, weight_bytes: int, matrix_params: int, batch: int, tokens: int) -> tuple[int, int]:
    """(bytes that must move, FLOPs) for one decoded token per sequence: weights + latent cache read once,
    FLOPs of the absorbed form (weights' matmuls + MQA over the latent)."""
    from mla_fx.cost import attention_flops_per_token

    cache_bytes = 4 * batch * tokens * spec.latent_dim
    flops = batch * (2 * matrix_params + attention_flops_per_token(spec, tokens + 1))
    return weight_bytes + cache_bytes, flops


def matrix_params(model: torch.nn.Module) -> int:
    """Parameters used as matmul operands by one token (2-D weights, not the embedding table)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not emb)


class HFStep:
    """One HF decode step over a DynamicCache holding T latent rows (cropped back after each step)."""

    def __init__(self, model, past: torch.Tensor, d_c: int):
        from transformers import DynamicCache

        self.model, self.tokens = model, past.shape[1]
        b = past.shape[0]
        self.cache = DynamicCache(config=model.config)
        self.cache.update(past[..., :d_c].reshape(b, 1, self.tokens, d_c).contiguous(),
                          past[..., d_c:].reshape(b, 1, self.tokens, -1).contiguous(), 0)

    def __call__(self, ids, positions, impl: str) -> torch.Tensor:
        self.model.set_attn_implementation(impl)
        with torch.no_grad():
            logits = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache,
                                use_cache=True).logits
        self.cache.crop(self.tokens - self.cache.get_seq_length())  # drop the new row
        return logits


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def measure_one(model, programs, session, heads: int, batch: int, tokens: int, expands: bool,
                mach: roofline.Machine, budget: float) -> dict:
    """All back-ends for one (heads, batch, cached tokens) point, on the same weights and cache rows."""
    spec = programs.sites[0].spec
    g = torch.Generator().manual_seed(tokens + batch)
    past = torch.randn(batch, tokens, spec.latent_dim, generator=g)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=g)
    pos = torch.full((batch, 1), tokens, dtype=torch.int64)
    mask = torch.ones(batch, tokens + 1, dtype=torch.int64)
    moved, flops = step_cost(spec, param_bytes(model), matrix_params(model), batch, tokens)
    row = {"heads": heads, "batch": batch, "cache_tokens": tokens, "floor_ms": mach.floor_s(moved, flops) * 1e3,
           "bytes_moved_MB": moved / 1e6, "GFLOP": flops / 1e9, "latent_op_expands": expands}
    outputs = {}
    hf_bytes = hf_step_bytes(spec, batch, tokens)
    if hf_bytes > MEMORY_LIMIT:
        row["note"] = (f"HF skipped at {heads} heads, batch {batch}, {tokens} tokens: it would allocate "
                       f"{hf_bytes / 1e9:.0f} GB of expanded K/V per step")
    else:
        hf = HFStep(model, past, spec.kv_lora_rank)
        for impl in ("eager", "sdpa"):
            seconds, logits = time_call(lambda impl=impl: hf(ids, pos, impl), budget)
            row[f"hf_{impl}_ms"], outputs[f"hf_{impl}"] = seconds * 1e3, logits.numpy()
        del hf
        free_memory()
    torch_bytes = torch_step_bytes(spec, batch, tokens, expands)
    if torch_bytes > MEMORY_LIMIT:
        row["note_torch"] = (f"mla-fx torch skipped at {heads} heads, batch {batch}, {tokens} tokens: "
                             "mla_fx::latent_attention (CPU reference) copies the latent once per head "
                             f"when batch > 1, {torch_bytes / 1e9:.0f} GB")
    else:
        with torch.no_grad():
            seconds, out = time_call(lambda: programs.step(ids, pos, mask, past), budget)
        row["mlafx_torch_ms"], outputs["mlafx_torch"] = seconds * 1e3, out[0].numpy()
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy(),
             "past_latent.0": past.numpy()}
    seconds, out = time_call(lambda: session.run(None, feeds), budget)
    row["mlafx_ort_ms"], outputs["mlafx_ort"] = seconds * 1e3, out[0]
    ref = outputs.get("hf_sdpa", outputs.get("mlafx_torch", outputs["mlafx_ort"]))
    if len(outputs) > 1:
        row["max_rel_diff"] = max(rel_diff(v, ref) for v in outputs.values())
    for b in BACKENDS:
        if f"{b}_ms" in row:
            row[f"{b}_x_floor"] = row[f"{b}_ms"] / row["floor_ms"]
    for b in ("mlafx_torch", "mlafx_ort"):
        if "hf_sdpa_ms" in row and f"{b}_ms" in row:
            row[f"speedup_{b}_vs_hf_sdpa"] = row["hf_sdpa_ms"] / row[f"{b}_ms"]
            row[f"speedup_{b}_vs_hf_eager"] = row["hf_eager_ms"] / row[f"{b}_ms"]
    if "mlafx_torch_ms" in row:
        row["ort_over_torch"] = row["mlafx_ort_ms"] / row["mlafx_torch_ms"]
    print(f"[decode] {heads}h b{batch} T={tokens}: " + ", ".join(
        f"{LABELS[b]} {row[f'{b}_ms']:.1f} ms" for b in BACKENDS if f"{b}_ms" in row), flush=True)
    return row


def measure_heads(heads: int, batches, lengths, mach: roofline.Machine, budget: float) -> list[dict]:
    model, programs = v3_model_and_programs(heads)
    spec = programs.sites[0].spec
    onnx_path, _ = step_onnx(f"deepseek-v3-{heads}h", programs)
    session = ort_session(onnx_path)
    expands = latent_op_expands(spec.kv_lora_rank, spec.qk_rope_head_dim)
    rows = [measure_one(model, programs, session, heads, b, t, expands, mach, budget)
            for b in batches for t in lengths]
    del session
    free_memory()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = sorted({(r["heads"], r["batch"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (h, b) in zip(axes[0], panels, strict=True):
        sel = [r for r in rows if r["heads"] == h and r["batch"] == b]
        for key, label, style in [(f"{k}_ms", LABELS[k], "o-") for k in BACKENDS] + [("floor_ms", "floor", "k--")]:
            pts = [(r["cache_tokens"], r[key]) for r in sel if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="cached tokens", ylabel="ms per decode step",
               title=f"{h} heads, batch {b}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_fig(fig, path, "One MLA layer at DeepSeek-V3 sizes: decode step, fp32 CPU")


def run(out: Path, quick: bool = False, mach: roofline.Machine | None = None) -> Report:
    setup_threads()
    report = Report(out, "decode_cpu")
    mach = mach or roofline.measure(quick)
    heads_list, batches, lengths = grid(quick)
    rows = []
    for heads in heads_list:
        rows += measure_heads(heads, batches, lengths, mach, budget=1.0 if quick else 2.0)
    cols = ["heads", "batch", "cache_tokens", "hf_eager_ms", "hf_sdpa_ms", "mlafx_torch_ms", "mlafx_ort_ms",
            "speedup_mlafx_torch_vs_hf_sdpa", "speedup_mlafx_ort_vs_hf_sdpa", "ort_over_torch", "max_rel_diff"]
    notes = [r[k] for r in rows for k in ("note", "note_torch") if k in r]
    report.add_table(
        "Decode step, one MLA layer at DeepSeek-V3 sizes (fp32, ms per step; speedups are HF sdpa time / ours)",
        [c.replace("speedup_", "x_").replace("_vs_hf_sdpa", "") for c in cols],
        [{c.replace("speedup_", "x_").replace("_vs_hf_sdpa", ""): r.get(c) for c in cols} for r in rows],
        "Same weights and the same cached latent rows for every back-end; max_rel_diff: largest "
        "max|logits - HF sdpa| / max|HF sdpa| over the back-ends.\n" + "\n".join(f"- {n}" for n in notes))
    rcols = ["heads", "batch", "cache_tokens", "bytes_moved_MB", "GFLOP", "floor_ms",
             "hf_sdpa_x_floor", "mlafx_torch_x_floor", "mlafx_ort_x_floor"]
    report.add_table("Decode step against the roofline floor (measured / floor)", rcols, rows,
                     f"floor = max(bytes / {mach.copy_gbs:.1f} GB/s copy bandwidth, FLOPs / "
                     f"{mach.gemm_gflops:.0f} GFLOP/s GEMM); bytes = all weights + the latent cache read once "
                     "(fp32), FLOPs of the absorbed form.")
    return report.finish(rows, plot)


def main(argv=None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
