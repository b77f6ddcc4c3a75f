"""Prefill: absorbed vs un-absorbed attention for prompts of 16..4096 tokens, against mla_fx.cost.

    python -m benchmarks.prefill_crossover [--quick] [--out DIR]

One MLA layer at DeepSeek-V3 attention sizes, 32-head shard, batch 1, fp32. Absorbed = the step
program with an empty past (MQA over the latent); un-absorbed = the prefill program (K/V expanded from
the latent, head dims 192/128). The cost model's FLOP ratio for the same prompt (mla_fx.cost.prefill_flops,
no cached prefix) is shown beside the measured time ratio.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import (
    Report,
    pyplot,
    save_fig,
    setup_threads,
    standalone_main,
    time_call,
    v3_model_and_programs,
)

HEADS = 32


def lengths(quick: bool) -> list[int]:
    return [16, 32, 64, 128, 256] if quick else [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def measure(programs, tokens: int, budget: float) -> dict:
    from mla_fx.cost import prefill_flops

    spec = programs.sites[0].spec
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, programs.vocab_size, (1, tokens), generator=g)
    pos = torch.arange(tokens).unsqueeze(0)
    mask = torch.ones(1, tokens, dtype=torch.int64)
    empty = torch.zeros(1, 0, spec.latent_dim)
    with torch.no_grad():
        absorbed, a_out = time_call(lambda: programs.step(ids, pos, mask, empty), budget)
        unabsorbed, u_out = time_call(lambda: programs.prefill(ids, pos, mask), budget)
    flops = prefill_flops(spec, tokens, 0)
    row = {"prompt_tokens": tokens, "absorbed_ms": absorbed * 1e3, "unabsorbed_ms": unabsorbed * 1e3,
           "measured_absorbed_over_unabsorbed": absorbed / unabsorbed,
           "predicted_flops_absorbed_over_unabsorbed": flops["absorbed"] / flops["unabsorbed"],
           "logits_max_rel_diff": float((a_out[0] - u_out[0]).abs().max() / u_out[0].abs().max()),
           "absorbed_attention_GFLOP": flops["absorbed"] / 1e9, "unabsorbed_attention_GFLOP": flops["unabsorbed"] / 1e9}
    print(f"[prefill] {tokens} tokens: absorbed {row['absorbed_ms']:.1f} ms, un-absorbed {row['unabsorbed_ms']:.1f} ms",
          flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    xs = [r["prompt_tokens"] for r in rows]
    ax.plot(xs, [r["absorbed_ms"] for r in rows], "o-", label="absorbed (step program, empty past)")
    ax.plot(xs, [r["unabsorbed_ms"] for r in rows], "s-", label="un-absorbed (prefill program)")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms per prefill")
    ax2.plot(xs, [r["measured_absorbed_over_unabsorbed"] for r in rows], "o-", label="measured time ratio")
    ax2.plot(xs, [r["predicted_flops_absorbed_over_unabsorbed"] for r in rows], "k--", label="cost model FLOP ratio")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="absorbed / un-absorbed")
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    save_fig(fig, path, f"Prefill, one MLA layer at DeepSeek-V3 sizes ({HEADS} heads), fp32 CPU")


def run(out: Path, quick: bool = False) -> Report:
    from mla_fx.cost import crossover_tokens

    setup_threads()
    report = Report(out, "prefill_crossover")
    _, programs = v3_model_and_programs(HEADS)
    rows = [measure(programs, t, 1.0 if quick else 2.0) for t in lengths(quick)]
    faster = [r["prompt_tokens"] for r in rows if r["measured_absorbed_over_unabsorbed"] > 1]
    measured = f"un-absorbed is faster from {faster[0]} tokens on" if faster else "absorbed was faster at every length"
    cols = ["prompt_tokens", "absorbed_ms", "unabsorbed_ms", "measured_absorbed_over_unabsorbed",
            "predicted_flops_absorbed_over_unabsorbed", "logits_max_rel_diff"]
    report.add_table(
        f"Prefill of one MLA layer, {HEADS}-head DeepSeek-V3 shard, batch 1, fp32 (absorbed / un-absorbed)",
        cols, rows,
        f"Measured: {measured}. Cost model: with no cached prefix the un-absorbed form always costs fewer FLOPs "
        "(ratio > 1 at every length), so mla-fx prefills with the prefill program; over a long cached prefix the "
        f"FLOP crossover is {crossover_tokens(programs.sites[0].spec):.1f} new tokens (mla_fx.cost.crossover_tokens), "
        "not measured here (the prefill program takes no past).")
    return report.finish(rows, plot)


def main(argv=None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
