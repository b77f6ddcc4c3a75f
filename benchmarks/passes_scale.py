"""The passes at scale: `absorb` time and peak memory for 1, 2, 4, 8 layers at DeepSeek-V3 attention sizes.

    python -m benchmarks.passes_scale [--quick] [--out DIR]

Each size runs in its own process (so peak memory is its own): build the model (random weights,
128 heads, tiny MLP and vocab), capture it (torch.export), then time mla_fx.absorb.absorb on the
captured graph and read the process's peak resident memory during it (Linux VmHWM, reset just before).
Aims: time linear in layers; extra peak memory about one layer's weights at most.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import DEFAULT_OUT, Report, pyplot, save_fig

HEADS = 128


def layer_counts(quick: bool) -> list[int]:
    return [1, 2] if quick else [1, 2, 4, 8]


def worker(layers: int) -> dict:
    """Runs in a child process; prints one JSON line."""
    import torch

    from mla_fx.absorb import absorb

    from .common import (
        build_hf,
        deepseek_v3_config,
        loaded_model,
        param_bytes,
        peak_rss_bytes,
        reset_peak_rss,
        rss_bytes,
        setup_threads,
    )

    setup_threads()
    t0 = time.perf_counter()
    model = build_hf(deepseek_v3_config(HEADS, layers=layers))
    build_s = time.perf_counter() - t0
    weights = param_bytes(model)
    layer_bytes = param_bytes(model.model.layers[0])
    t0 = time.perf_counter()
    gm = loaded_model(model, f"{layers} layers").capture()
    capture_s = time.perf_counter() - t0
    before = rss_bytes()
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = absorb(gm)
    absorb_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"layers": layers, "sites": len(result.sites), "mode": result.mode, "build_s": build_s,
            "capture_s": capture_s, "absorb_s": absorb_s, "absorb_s_per_layer": absorb_s / layers,
            "weights_GB": weights / 1e9, "layer_weights_GB": layer_bytes / 1e9, "rss_before_GB": before / 1e9,
            "peak_GB": peak / 1e9, "extra_peak_GB": (peak - before) / 1e9,
            "extra_peak_over_layer": (peak - before) / layer_bytes, "peak_over_weights": peak / weights,
            "peak_measure": "VmHWM reset before absorb" if exact else "ru_maxrss (whole process)"}


def measure(layers: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"{__package__}.passes_scale", "--worker", str(layers)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-5:])
        print(f"[passes] {layers} layers failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"layers": layers, "error": f"exit {proc.returncode}"}
    row = json.loads(lines[-1])
    print(f"[passes] {layers} layers: absorb {row['absorb_s']:.2f} s, extra peak {row['extra_peak_GB']:.2f} GB "
          f"({row['extra_peak_over_layer']:.2f} layers' weights)", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in rows if "absorb_s" in r]
    xs = [r["layers"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    ax.plot(xs, [r["absorb_s"] for r in rows], "o-", label="absorb")
    ax.plot(xs, [r["capture_s"] for r in rows], "s--", label="capture (torch.export)")
    ax.plot(xs, [rows[0]["absorb_s"] * x / xs[0] for x in xs], "k:", label="linear in layers")
    ax.set(xscale="log", yscale="log", xlabel="layers", ylabel="seconds")
    ax2.plot(xs, [r["weights_GB"] for r in rows], "k--", label="model weights")
    ax2.plot(xs, [r["peak_GB"] for r in rows], "o-", label="peak RSS during absorb")
    ax2.plot(xs, [r["extra_peak_GB"] for r in rows], "s-", label="extra over RSS before absorb")
    ax2.set(xscale="log", yscale="log", xlabel="layers", ylabel="GB")
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    save_fig(fig, path, f"absorb at DeepSeek-V3 attention sizes ({HEADS} heads), fp32")


def run(out: Path, quick: bool = False) -> Report:
    report = Report(out, "passes_scale")
    rows = [measure(n) for n in layer_counts(quick)]
    cols = ["layers", "absorb_s", "absorb_s_per_layer", "capture_s", "weights_GB", "rss_before_GB", "peak_GB",
            "extra_peak_GB", "extra_peak_over_layer", "peak_over_weights"]
    ok = [r for r in rows if "absorb_s" in r]
    note = ""
    if len(ok) >= 2:
        growth = ok[-1]["absorb_s"] / ok[0]["absorb_s"] / (ok[-1]["layers"] / ok[0]["layers"])
        note = (f"absorb time from {ok[0]['layers']} to {ok[-1]['layers']} layers grew {growth:.2f}x the linear "
                f"expectation; extra peak memory at most {max(r['extra_peak_over_layer'] for r in ok):.2f} layers' "
                f"weights ({ok[0]['layer_weights_GB']:.2f} GB per layer, fp32). Peak measured as "
                f"{ok[0]['peak_measure']}, one process per size.")
    report.add_table(f"absorb at scale: DeepSeek-V3 attention sizes, {HEADS} heads, fp32", cols, rows, note)
    return report.finish(rows, plot)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker)), flush=True)
        return 0
    run(a.out, a.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
