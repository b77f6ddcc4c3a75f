"""Run the CPU benchmark suite: tables on stdout; CSV, PNG and results.md in --out.

    python -m benchmarks.run_all [--quick] [--out DIR] [--only NAME,...]

Benchmarks: roofline, cache_size, decode_cpu, prefill_crossover, passes_scale (see each module); these run by
default: --quick takes about a minute on a quiet 2-core machine, the full set under 15 minutes.
checkpoint_scale runs when named (--only checkpoint_scale): it writes real-size checkpoints (tens of GB of disk)
and takes about an hour; --quick makes it two small V2-Lite cuts.
GPU measurements are not part of this suite (it says so): the kernel's are python -m benchmarks.kernel_gpu.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import cache_size, checkpoint_scale, decode_cpu, passes_scale, prefill_crossover, roofline
from .common import DEFAULT_OUT, machine, machine_line, setup_threads, v3_model_and_programs

NAMES = ("roofline", "cache_size", "decode_cpu", "prefill_crossover", "passes_scale", "checkpoint_scale")
DEFAULT = NAMES[:-1]  # checkpoint_scale writes tens of GB: only when named


def gpu_note() -> str:
    import torch

    if torch.cuda.is_available():
        return (f"GPU: {torch.cuda.get_device_name(0)} present, but this suite measures CPU only; the Triton "
                "kernel's bandwidth and SDPA comparison: python -m benchmarks.kernel_gpu")
    return "GPU: no CUDA device on this machine; GPU measurements (python -m benchmarks.kernel_gpu) skipped."


def targets(decode_rows: list[dict]) -> list[str]:
    """The issue's decode aims, checked against the measured rows."""
    lines = []
    at16k = [r for r in decode_rows if r["heads"] == 128 and r["batch"] == 1 and r["cache_tokens"] == 16384]
    if at16k:
        r = at16k[0]
        for impl in ("sdpa", "eager"):
            x = r.get(f"speedup_mlafx_torch_vs_hf_{impl}")
            if x is not None:
                lines.append(f"- rewritten PyTorch step >= 100x faster than HF {impl} at 16k cache, 128 heads: "
                             f"{x:.0f}x ({'met' if x >= 100 else 'NOT met'}; HF {r[f'hf_{impl}_ms']:.0f} ms, "
                             f"mla-fx {r['mlafx_torch_ms']:.1f} ms)")
    else:
        lines.append("- 100x at 16k cache / 128 heads: not measured in this run (--quick stops at 4k)")
    ratios = [r["ort_over_torch"] for r in decode_rows if r.get("ort_over_torch") is not None]
    if ratios:
        worst = max(ratios)
        lines.append(f"- ONNX Runtime within 1.5x of the rewritten PyTorch step: worst ORT/torch = {worst:.2f} "
                     f"({'met' if worst <= 1.5 else 'NOT met'}; best {min(ratios):.2f})")
    for b in ("mlafx_torch", "mlafx_ort"):
        xs = [r[f"{b}_x_floor"] for r in decode_rows if r.get(f"{b}_x_floor") is not None]
        if xs:
            lines.append(f"- {decode_cpu.LABELS[b]} within 1.5x of the roofline floor: measured/floor "
                         f"{min(xs):.1f}..{max(xs):.1f} ({'met' if max(xs) <= 1.5 else 'NOT met'})")
    return lines


def main(argv=None, prog: str = "python -m benchmarks.run_all") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller grid, about a minute")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--only", default=",".join(DEFAULT),
                   help=f"comma-separated subset of {','.join(NAMES)} (default: all but checkpoint_scale)")
    a = p.parse_args(argv)
    only = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(NAMES))
    if unknown or not only:
        p.error(f"unknown benchmark(s) {unknown}; known: {', '.join(NAMES)}" if unknown else "--only names nothing")
    from mla_fx.outputs import check_writable

    check_writable(a.out, directory=True, what="the results")  # before minutes of measuring
    setup_threads()
    start = time.perf_counter()
    info = machine()
    print(f"mla-fx benchmarks ({'quick' if a.quick else 'full'}) on {machine_line(info)}\n{gpu_note()}\n", flush=True)

    sections, timings, mach, decode_rows, goal = [], {}, None, [], []
    for name in NAMES:
        if name not in only:
            continue
        t0 = time.perf_counter()
        if name == "roofline":
            report, mach = roofline.run(a.out, a.quick)
        elif name == "decode_cpu":
            report = decode_cpu.run(a.out, a.quick, mach)
            decode_rows = report.rows
        elif name == "passes_scale":
            v3_model_and_programs.cache_clear()  # the children need the memory
            report = passes_scale.run(a.out, a.quick)
        elif name == "checkpoint_scale":
            report = checkpoint_scale.run(a.out, a.quick)
            goal += checkpoint_scale.targets(report.rows)
        else:
            report = {"cache_size": cache_size, "prefill_crossover": prefill_crossover}[name].run(a.out, a.quick)
        timings[name] = time.perf_counter() - t0
        sections.append(report.markdown())
    total = time.perf_counter() - start

    command = "python -m benchmarks.run_all" + (" --quick" if a.quick else "")
    if set(only) != set(DEFAULT):
        command += f" --only {','.join(only)}"
    goal = (targets(decode_rows) if decode_rows else []) + goal
    summary = [f"# mla-fx benchmarks ({'quick' if a.quick else 'full'})", "",
               f"command: `{command}`  ", f"machine: {machine_line(info)}  ",
               f"total time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})", "",
               gpu_note(), ""]
    if goal:
        summary += ["## Targets", ""] + goal + [""]
    plots = sorted(Path(a.out).glob("*.png"))
    text = "\n".join(summary) + "\n" + "\n".join(sections)
    if plots:
        text += "\n### Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.md").write_text(text)
    print("\n".join(goal))
    print(f"\n{gpu_note()}\nwrote {Path(a.out) / 'results.md'} and the CSV/PNG files beside it; "
          f"total {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
