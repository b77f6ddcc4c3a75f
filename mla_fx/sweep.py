"""The architecture sweep: every MLA architecture of the installed transformers, built tiny as it really
is (mla_fx/models/architectures.py), saved as a checkpoint directory and put through the command line
as a user would: `mla-fx absorb DIR --dtypes float64` (the rewrite checked against the HF
model's logits and greedy generation) and `mla-fx export DIR --onnx` (ONNX Runtime's prompt logits,
decode steps and greedy generation checked against the HF model).

    python -m mla_fx.sweep [NAME ...] [--markdown]    # the README's table is this command's output

Each row says where an architecture stops and the message mla-fx printed there.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

STAGES = ("build", "absorb", "export")


@dataclass
class SweepRow:
    name: str
    model_class: str = ""
    passed: tuple[str, ...] = ()  # the stages that passed, in order
    failed: str | None = None  # the stage that failed
    message: str = ""  # what mla-fx (or transformers, for build) said there
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed is None


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line or line.startswith("FAILED")]
    return (errors or lines or [""])[-1][:400]


def _run_cli(argv: list[str]) -> tuple[int, str]:
    from mla_fx import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, out.getvalue() + err.getvalue()


def save_tiny(arch, directory: Path, seed: int = 0) -> str:
    """The architecture's tiny model with the zoo's random weights, saved as a checkpoint directory."""
    from mla_fx.models.architectures import tiny_checkpoint_config
    from mla_fx.models.hf import _randomise
    from mla_fx.transformers_loading import from_config

    torch.manual_seed(seed)
    model, choice = from_config(tiny_checkpoint_config(arch))
    _randomise(model, seed)
    model.save_pretrained(directory)
    return choice.cls.__name__


def sweep_one(arch, workdir: Path, decode_steps: int = 2) -> SweepRow:
    row = SweepRow(arch.name)
    start = time.perf_counter()
    model_dir = workdir / arch.name
    try:
        row.model_class = save_tiny(arch, model_dir)
        row.passed += ("build",)
    except Exception as e:  # transformers itself cannot build it at tiny sizes
        row.failed, row.message = "build", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    # absorb checked in float64 (the strict check), export in float32 (the ONNX Runtime check): each dtype once
    steps = [("absorb", ["absorb", str(model_dir), "-o", str(workdir / f"{arch.name}.pt2"), "-q",
                         "--dtypes", "float64", "--generate", "8"]),
             ("export", ["export", str(model_dir), "--onnx", "-o", str(workdir / f"{arch.name}-onnx"),
                         "--decode-steps", str(decode_steps), "-q"])]
    for stage, argv in steps:
        if row.failed:
            break
        code, text = _run_cli(argv)
        if code == 0:
            row.passed += (stage,)
        else:
            row.failed, row.message = stage, _last_error(text).replace(str(workdir), "DIR")
    row.seconds = time.perf_counter() - start
    return row


def run(names: list[str] | None = None, workdir: Path | None = None, progress=None) -> list[SweepRow]:
    from mla_fx.models.architectures import mla_architectures

    archs = [a for a in mla_architectures() if not names or a.name in names]
    unknown = sorted(set(names or ()) - {a.name for a in archs})
    if unknown:
        raise SystemExit(f"not MLA architectures of this transformers: {', '.join(unknown)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            rows.append(sweep_one(arch, Path(workdir or tmp)))
            if progress:
                progress(rows[-1])
    return rows


def markdown_row(r: SweepRow) -> str:
    mark = {stage: ("yes" if stage in r.passed else ("**no**" if stage == r.failed else "-")) for stage in STAGES}
    where = "" if r.ok else f"{r.failed}: `{r.message.replace('|', '/')}`"
    return f"| {r.name} | {r.model_class or '-'} | {mark['absorb']} | {mark['export']} | {where} |"


def markdown(rows: list[SweepRow]) -> str:
    import transformers

    lines = [f"| architecture (transformers {transformers.__version__}) | class | absorb + checks | "
             "ONNX export + ORT generation | where it stops |", "|---|---|---|---|---|"]
    lines += [markdown_row(r) for r in rows]
    passed = sum(r.ok for r in rows)
    lines.append("")
    lines.append(f"{passed} of {len(rows)} architectures go through absorb and export.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mla_fx.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures (transformers.models folders); default all")
    parser.add_argument("--markdown", action="store_true", help="print only the table (the README's)")
    args = parser.parse_args(argv)

    def progress(row: SweepRow) -> None:
        if not args.markdown:
            status = "ok" if row.ok else f"stops at {row.failed}: {row.message}"
            print(f"{row.name:16s} {row.seconds:6.1f}s  {status}", file=sys.stderr, flush=True)

    rows = run(args.names or None, progress=progress)
    print(markdown(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
