"""Shared helpers for the benchmarks: machine info, timing, model builders, tables, CSV and plots."""

from __future__ import annotations

import atexit
import csv
import gc
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
# benchmarks/results/ in a source checkout; ./mla-fx-bench-results where the package is installed elsewhere
DEFAULT_OUT = _HERE / "results" if (_HERE.parent / "pyproject.toml").is_file() else Path("mla-fx-bench-results")
THREADS = 2

# DeepSeek-V3 attention sizes (DeepSeek-V3 report, section 2.1); one layer, a tiny dense MLP and a tiny vocab so
# the attention dominates every measurement.
V3_ATTENTION = dict(hidden_size=7168, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128)
TINY_MLP, TINY_VOCAB = 64, 256


# ---- machine -------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import onnxruntime
    import transformers

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"load_1min": round(load, 2), "platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "memory_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__}


def machine_line(info: dict[str, Any] | None = None) -> str:
    m = info or machine()
    return (f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['memory_gib']} GiB, {m['platform']}; "
            f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
            f"onnxruntime {m['onnxruntime']}; load average {m['load_1min']}")


def setup_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)


# ---- timing --------------------------------------------------------------------------------------

def time_call(fn: Callable[[], Any], budget_s: float = 2.0, max_repeats: int = 15,
              min_repeats: int = 1) -> tuple[float, Any]:
    """(median wall time in seconds, the warm-up call's result): one warm-up call, then as many timed
    calls as fit in `budget_s` (at least `min_repeats`)."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    if first > 5 * budget_s:  # a step this slow is not warm-up dominated: one call is the measurement
        return first, result
    n = max(min_repeats, min(max_repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def free_memory() -> None:
    gc.collect()


# ---- models --------------------------------------------------------------------------------------

def deepseek_v3_config(heads: int = 128, layers: int = 1, attn: str = "sdpa", max_seq: int = 32768):
    """A DeepSeek-V3 config at full attention sizes with `heads` heads, a tiny dense MLP and vocab."""
    import transformers

    cfg = transformers.DeepseekV3Config(
        **V3_ATTENTION, num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=layers,
        first_k_dense_replace=layers, intermediate_size=TINY_MLP, vocab_size=TINY_VOCAB,
        max_position_embeddings=max_seq, rope_interleave=True, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=0, eos_token_id=1)
    cfg._attn_implementation = attn
    return cfg


def build_hf(cfg, seed: int = 0):
    """A randomly initialised HF causal LM (float32, eval) for `cfg`."""
    import transformers

    torch.manual_seed(seed)
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


def loaded_model(model, name: str):
    """Wrap a HF model as the LoadedModel that mla_fx.inference.build_programs takes."""
    from mla_fx.loading import LoadedModel
    from mla_fx.models.wrappers import CausalLMLogits

    cfg = model.config
    return LoadedModel(name, "hf", CausalLMLogits(model).eval(), None, cfg.vocab_size,
                       cfg.max_position_embeddings, cfg.to_dict())


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in list(module.parameters()) + list(module.buffers()):
        if p.data_ptr() not in seen and p.is_floating_point():
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# ---- output --------------------------------------------------------------------------------------

def fmt(v: Any) -> str:
    """A table cell: thousands separators, about three significant digits, '-' for missing."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.2f}"
    return f"{v:.2e}"


def table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], note: str = "",
          machine_text: str | None = None) -> str:
    """A GitHub-markdown table (also readable as plain text) with the machine (default: machine_line()) in
    its header."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [f"### {title}", "", f"machine: {machine_text or machine_line()}", ""]
    out += [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def pyplot():
    """matplotlib's pyplot on the Agg back-end, or None when matplotlib is missing (plots are skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: PNG plots skipped (pip install 'mla-fx[bench]')")
        return None
    return plt


def save_fig(fig, path: Path, title: str) -> None:
    fig.suptitle(f"{title}\n{machine()['cpu']}, {os.cpu_count()} cores, torch {torch.__version__}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


class Report:
    """Collects one benchmark's tables and files; prints tables as they are made."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = Path(out), name
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections: list[str] = []
        self.files: list[Path] = []

    def add_table(self, title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]], note: str = "") -> None:
        text = table(title, columns, rows, note)
        print(text, flush=True)
        self.sections.append(text)

    def csv(self, stem: str, rows: Sequence[dict[str, Any]]) -> None:
        path = self.out / f"{stem}.csv"
        write_csv(path, rows)
        self.files.append(path)

    def plot(self, stem: str) -> Path:
        path = self.out / f"{stem}.png"
        self.files.append(path)
        return path

    def finish(self, rows: Sequence[dict[str, Any]], plot: Callable[[Sequence[dict[str, Any]], Path], None]):
        """Write the rows as <name>.csv, plot them to <name>.png, keep them for run_all."""
        self.csv(self.name, rows)
        plot(rows, self.plot(self.name))
        self.rows = rows
        return self

    def markdown(self) -> str:
        return "\n".join(self.sections)


def export_step_onnx(programs, directory: Path):
    """Export the step (decode) program alone to `directory`/step.onnx, its weights beside it.

    Returns (path, onnx.ModelProto without weights loaded) so callers can read the cache inputs."""
    import onnx

    from mla_fx.export.onnx import lower_program
    from mla_fx.export.onnx_weights import save_models

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_models([lower_program(programs, "step", "custom")], directory, programs)
    return directory / "step.onnx", onnx.load(directory / "step.onnx", load_external_data=False)


def ort_session(path: Path, threads: int = THREADS):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---- memory --------------------------------------------------------------------------------------

def _status(field: str) -> int:
    import re

    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        return _status("VmRSS")
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so peak_rss_bytes() measures from here on."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        return _status("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



# ---- shared artefacts (one process runs the suite: build each V3-size model and export it once) ----

_WORKDIR: Path | None = None


def workdir() -> Path:
    """A temporary folder for ONNX exports, removed when the process exits."""
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="mla-fx-bench-"))
        atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
    return _WORKDIR


@lru_cache(maxsize=1)
def v3_model_and_programs(heads: int):
    """(HF model, mla-fx InferencePrograms) for one DeepSeek-V3-size layer with `heads` heads."""
    from mla_fx.inference import build_programs

    model = build_hf(deepseek_v3_config(heads))
    return model, build_programs(loaded_model(model, f"deepseek-v3 attention, {heads} heads"))


_EXPORTS: dict[str, tuple[Path, Any]] = {}


def step_onnx(key: str, programs) -> tuple[Path, Any]:
    """step.onnx for `programs`, exported once per key into workdir()."""
    if key not in _EXPORTS:
        print(f"[export] {key}: step program -> ONNX", flush=True)
        _EXPORTS[key] = export_step_onnx(programs, workdir() / key)
    return _EXPORTS[key]


def standalone_main(run: Callable[[Path, bool], Any], doc: str | None, argv=None) -> int:
    """`python -m benchmarks.NAME [--quick] [--out DIR]` for one benchmark module."""
    import argparse

    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    run(a.out, a.quick)
    return 0
