"""Roofline: the machine's measured copy bandwidth and fp32 GEMM rate, and the floor of a decode step.

    python -m benchmarks.roofline [--quick] [--out DIR]

floor = max(bytes that must move / copy bandwidth, FLOPs / GEMM rate), where the bytes are the
weights read once plus the cache read once, and the FLOPs are the absorbed form's (the fewest).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import Report, setup_threads, standalone_main


@dataclass
class Machine:
    copy_gbs: float  # STREAM-style copy: (bytes read + bytes written) / time
    read_gbs: float  # a sum over a large tensor: bytes read / time
    gemm_gflops: float  # fp32 square GEMM

    def floor_s(self, bytes_moved: float, flops: float) -> float:
        return max(bytes_moved / (self.copy_gbs * 1e9), flops / (self.gemm_gflops * 1e9))


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(quick: bool = False) -> Machine:
    """Best of a few repeats: the figure the hardware can reach (a floor must not be beaten by noise)."""
    n = (256 if quick else 512) * 2**20 // 4  # 256 / 512 MiB of fp32, far beyond any cache
    src, dst = torch.ones(n), torch.empty(n)
    copy = 2 * n * 4 / _best(lambda: dst.copy_(src), 5) / 1e9
    read = n * 4 / _best(lambda: src.sum(), 5) / 1e9
    m = 2048 if quick else 4096
    a, b = torch.randn(m, m), torch.randn(m, m)
    gemm = 2 * m**3 / _best(lambda: a @ b, 3 if quick else 5) / 1e9
    return Machine(copy, read, gemm)


def run(out: Path, quick: bool = False) -> tuple[Report, Machine]:
    setup_threads()
    report = Report(out, "roofline")
    mach = measure(quick)
    rows = [{"measure": "copy bandwidth (read+write)", "value": mach.copy_gbs, "unit": "GB/s"},
            {"measure": "read bandwidth (sum)", "value": mach.read_gbs, "unit": "GB/s"},
            {"measure": "fp32 GEMM rate", "value": mach.gemm_gflops, "unit": "GFLOP/s"}]
    report.add_table("Roofline: the machine's measured limits", ["measure", "value", "unit"], rows,
                     "Best of 5 repeats; the decode floors below use the copy bandwidth and the GEMM rate.")
    report.csv("roofline", rows)
    return report, mach


def main(argv=None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
