"""Python API behind the CLI: absorb a loaded model, check it, write the program and the report."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mla_fx.absorb import AbsorbConfig, AbsorbResult, absorb, save_program, save_report, to_program
from mla_fx.check import DTYPES, LOW_PRECISION, Comparison, compare_generation, compare_logits, random_inputs
from mla_fx.errors import CheckFailed, MLAFXError
from mla_fx.loading import LoadedModel
from mla_fx.passes.manager import PassResult
from mla_fx.precision import in_dtype, true_float64

EACH_PASS_INPUTS = ((2, 11),)


class Progress:
    """One line per step on stderr with the elapsed time, so long runs show where they are."""

    def __init__(self, quiet: bool = False):
        self.start, self.quiet = time.perf_counter(), quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def bf16_supported() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def default_dtypes(loaded: LoadedModel) -> list[torch.dtype]:
    if loaded.module is None:  # an exported program runs in the dtype it was exported in
        return [loaded.dtype]
    return [torch.float64, torch.float32] + ([torch.bfloat16] if bf16_supported() else [])


def parse_dtypes(text: str) -> list[torch.dtype]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--dtypes {text!r} names no dtype; choose from {', '.join(DTYPES)}")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    return [DTYPES[n] for n in names]


def token_prompts(loaded: LoadedModel) -> list[list[int]]:
    """Real text for the shipped byte-level model, seeded random token sequences of two lengths otherwise."""
    from mla_fx.check_backends import default_prompts

    if loaded.source == "builtin":
        from mla_fx.models.tokenizer import encode

        return [encode("The "), encode("A list of ")]
    return default_prompts(loaded.vocab_size)


def prompts(loaded: LoadedModel) -> list[tuple[str, torch.Tensor]]:
    label = "text" if loaded.source == "builtin" else "random prompt"
    return [(label, torch.tensor([token_prompts(loaded)[0]]))]


def check_generation_fits(loaded: LoadedModel, tokens: int) -> None:
    """Generated tokens after the check prompt must stay within the model's positions."""
    longest = max(len(p[0]) for _, p in prompts(loaded))
    if tokens and loaded.max_seq and longest + tokens > loaded.max_seq:
        raise MLAFXError(f"--generate {tokens}: the {longest}-token check prompt plus {tokens} new tokens pass the "
                         f"model's {loaded.max_seq} positions; use --generate {loaded.max_seq - longest} or less")


@dataclass
class Run:
    """An absorbed model together with the checks it passed or failed."""

    result: AbsorbResult
    comparisons: list[Comparison] = field(default_factory=list)
    example: tuple[torch.Tensor, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


def _each_pass_checker(reference: Callable, dtype: torch.dtype, vocab: int, progress: Progress):
    inputs = random_inputs(vocab, EACH_PASS_INPUTS)

    def after(name: str, result: PassResult) -> None:
        (cmp,) = compare_logits(reference, in_dtype(result.gm, dtype), inputs, dtype)
        progress(f"  after {name}: {cmp.line()}")
        if not cmp.passed:
            raise CheckFailed(f"numerics break in pass {name}: {cmp.line()}")

    return after


def absorb_and_check(loaded: LoadedModel, config: AbsorbConfig, dtype: torch.dtype | None = None, *,
                     check: bool = True, each_pass: bool = False, generate_tokens: int = 0,
                     dump_graphs: Path | None = None, progress: Progress | None = None,
                     pipeline: Sequence | None = None) -> Run:
    """Capture the model in `dtype`, run the pipeline, compare rewritten against original."""
    progress = progress or Progress(quiet=True)
    check_generation_fits(loaded, generate_tokens if check else 0)
    model = loaded.to(dtype) if dtype is not None else loaded
    dtype = model.dtype
    name = str(dtype).removeprefix("torch.")
    progress(f"capturing {loaded.name} ({name}) with torch.export")
    with true_float64(dtype):
        gm = model.capture()
    reference = in_dtype(model.reference(), dtype)
    hooks: list[Callable[[str, PassResult], None]] = [lambda n, r: progress(f"pass {n}: {_brief(r.stats)}")]
    if dump_graphs is not None:
        dump_graphs.mkdir(parents=True, exist_ok=True)
        (dump_graphs / f"{name}_00_captured.py").write_text(gm.code)
        counter = itertools.count(1)
        hooks.append(lambda n, r: (dump_graphs / f"{name}_{next(counter):02d}_{n}.py").write_text(r.gm.code))
    if each_pass:
        hooks.append(_each_pass_checker(reference, dtype, loaded.vocab_size, progress))
    result = absorb(gm, config, lambda n, r: [h(n, r) for h in hooks], pipeline)
    run = Run(result, example=model.example())
    if check:
        progress(f"checking rewritten vs original ({name})")
        rewritten = in_dtype(result.gm, dtype)
        exact = None
        if dtype in LOW_PRECISION and loaded.module is not None:  # judged against the original in float64
            exact = in_dtype(loaded.to(torch.float64).reference(), torch.float64)
        run.comparisons += compare_logits(reference, rewritten, random_inputs(loaded.vocab_size), dtype,
                                          exact=exact)
        if generate_tokens:
            for label, prompt in prompts(loaded):
                run.comparisons.append(compare_generation(reference, rewritten, prompt, generate_tokens,
                                                          f"{name} {label}"))
    return run


def _brief(stats: dict) -> str:
    keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str)) or (k == "skipped" and v)}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "done"


def write_outputs(run: Run, loaded: LoadedModel, out: Path, report_path: Path | None,
                  progress: Progress) -> None:
    progress(f"exporting the rewritten program to {out}")
    program = to_program(run.result.gm, run.example, max_seq=loaded.max_seq)
    save_program(program, out)
    if report_path is not None:
        report = {"model": loaded.name, **run.result.report(),
                  "checks": [c.to_dict() for c in run.comparisons]}
        save_report(report, report_path)
