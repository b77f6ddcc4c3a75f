"""mla-fx command line: absorb, check, inspect."""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

import torch

from mla_fx.api import token_prompts
from mla_fx.errors import CheckFailed, MLAFXError, UnstreamableCheckpoint


def _count(minimum: int):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def _ptx_version(text: str) -> int:
    """argparse type: a PTX ISA version such as 8.0, as 80 (bounds are checked against the GPU later)."""
    match = re.fullmatch(r"(\d+)\.(\d)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"a PTX ISA version looks like 8.0 or 9.4, not {text!r}")
    return 10 * int(match.group(1)) + int(match.group(2))


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a .pt2 program, a HF or mla-fx model directory, a weights file (with --config), "
                        "a pickled module (with --trust-pickle), 'example' (the shipped model) or 'zoo:NAME'")
    p.add_argument("--config", type=Path, help="config.json for a bare state dict / safetensors file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (unpickling runs code from the file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["auto", "reassociate", "fold"], default="auto",
                   help="absorption: reassociate (W_UK/W_UV applied per head at run time), fold (pre-multiplied "
                        "weights) or auto (the cost model picks)")
    p.add_argument("--check-each-pass", action="store_true", help="check numerics after every pass; name the first "
                                                                   "pass that breaks them")
    p.add_argument("--dump-graphs", type=Path, metavar="DIR", help="write the graph after each pass to DIR")
    p.add_argument("--generate", type=_count(0), default=40, metavar="N",
                   help="also compare N greedily generated tokens (0: off; default 40)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("absorb", help="rewrite MLA into absorbed MQA over the latent cache; write a .pt2")
    _model_args(p)
    _check_args(p)
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="OUT.pt2: the rewritten program with its weights (models that fit in memory); a folder: an "
                        "absorbed checkpoint, weights streamed shard by shard (a HF safetensors MODEL of any size)")
    p.add_argument("--report", type=Path, help="write a JSON report (sites, specs, costs, pass stats, checks)")
    p.add_argument("--dtypes", default=None,
                   help="dtypes to check in, comma separated (default: the model's dtype and float64)")
    p.add_argument("--no-check", action="store_true", help="skip the equivalence check (not recommended)")
    p.add_argument("--force", action="store_true", help="write the output even if the check fails")
    p.add_argument("--max-shard-size", type=_non_negative_float, default=2.0, metavar="GB",
                   help="absorbed checkpoint: largest output shard, in GB (memory holds about one; default 2)")
    p.add_argument("--check-memory", type=_non_negative_float, default=4.0, metavar="GIB",
                   help="absorbed checkpoint: run the end-to-end check (the model three times in memory, once in "
                        "float64) only where it needs at most this much; every layer is checked anyway (default 4)")

    p = sub.add_parser("check", help="numerical equivalence of the rewrite (or of a written .pt2) with MODEL")
    _model_args(p)
    _check_args(p)
    p.add_argument("--rewritten", type=Path, help="compare this absorbed .pt2 instead of rewriting in memory")
    p.add_argument("--dtypes", default=None, help="comma separated (default float64,float32[,bfloat16])")

    p.add_argument("--onnx", type=Path, metavar="DIR",
                   help="compare the original, the rewritten inference programs and this ONNX export")
    p.add_argument("--trt", type=Path, metavar="DIR",
                   help="compare the original and the TensorRT engines in DIR (needs tensorrt and a GPU)")
    p.add_argument("--decode-steps", type=_count(1), default=64,
                   help="token-by-token decode steps with --onnx/--trt")

    p = sub.add_parser("inspect", help="list the MLA sites and their specs, without rewriting")
    _model_args(p)

    p = sub.add_parser("export", help="inference programs over the latent KV cache, exported to ONNX")
    _model_args(p)
    p.add_argument("--onnx", action="store_true", help="export ONNX models (step.onnx, prefill.onnx)")
    p.add_argument("--trt", action="store_true",
                   help="build TensorRT engines (step.engine, prefill.engine) with the mla_fx::LatentAttention "
                        "plugin; needs tensorrt and an NVIDIA GPU (default dtype float16)")
    p.add_argument("--max-batch", type=_count(1), default=8, help="TensorRT profile: largest batch")
    p.add_argument("--max-new-tokens", type=_count(1), default=512, help="TensorRT profile: longest prompt")
    p.add_argument("--max-cache", type=_count(1), default=4096, help="TensorRT profile: longest cache")
    p.add_argument("--plugin", choices=["aot", "jit"], default="aot",
                   help="TensorRT plugin implementation: aot (PTX in the engine, no Python) or jit (debugging)")
    p.add_argument("--ptx-version", type=_ptx_version, default=None, metavar="X.Y",
                   help="PTX ISA version of the aot plugin's kernel; the driver running the engines must support "
                        "it (default: the oldest the GPU has, 8.0 on Hopper, which every driver for it accepts)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.add_argument("--mode", choices=["auto", "reassociate", "fold"], default="auto", help="absorption mode")
    p.add_argument("--attention", choices=["custom", "standard"], default="custom",
                   help="custom: mla_fx::LatentAttention node with a standard-op function body (TensorRT maps it "
                        "to its plugin); standard: the ONNX Attention op")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (>= 23, for Attention)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="weights, activations and cache dtype of the exported programs (default float32 for "
                        "--onnx, float16 for --trt)")
    p.add_argument("--decode-steps", type=_count(1), default=16, help="decode steps in the check after export")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check after export")
    p.add_argument("--check-memory", type=_non_negative_float, default=4.0, metavar="GIB",
                   help="HF checkpoint directories (their weights stream into the export): run the ONNX Runtime "
                        "check (the original and two sessions in memory) only where it needs at most this much "
                        "(default 4)")

    sub.add_parser("bench", help="the CPU benchmark suite: tables, CSV, plots (mla-fx bench --help)")

    p = sub.add_parser("generate", help="generate with an ONNX export in ONNX Runtime")
    p.add_argument("export_dir", type=Path, metavar="DIR", help="a folder written by mla-fx export --onnx or --trt")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (byte-level models); repeatable")
    p.add_argument("--ids", action="append", default=[], help="a prompt as comma-separated token ids; repeatable")
    p.add_argument("--max-new-tokens", type=_count(1), default=40)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_count(0), default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def _load_model(args):
    from mla_fx.loading import load_model

    loaded = load_model(args.model, config=args.config, trust_pickle=args.trust_pickle)
    if loaded.note:
        print(f"note: {loaded.note}")
    return loaded


def _print_sites(sites, mode: str | None = None) -> None:
    from mla_fx.cost import mode_costs

    print(f"{'layer':>5}  {'module':<34} {'H':>4} {'d_c':>5} {'d_r':>4} {'d_nope':>6} {'d_v':>4} {'q_lora':>6} "
          f"{'scale':>8} {'rope':<12} {'KV B/tok bf16':>14} {'latent B/tok':>12}")
    for i, s in enumerate(sites):
        sp = s.spec
        b = sp.cache_bytes_per_token(2)
        print(f"{i:>5}  {s.module[-34:]:<34} {sp.n_heads:>4} {sp.kv_lora_rank:>5} {sp.qk_rope_head_dim:>4} "
              f"{sp.qk_nope_head_dim:>6} {sp.v_head_dim:>4} {str(sp.q_lora_rank):>6} {sp.softmax_scale:>8.5f} "
              f"{sp.rope_layout:<12} {b['expanded_kv']:>14} {b['latent']:>12}")
    if sites and sites[0].spec.hidden_size:
        c = mode_costs(sites[0].spec)
        line = ", ".join(f"{m}: {v.params:,} params / {v.flops_per_token:,} FLOPs per token" for m, v in c.items())
        print(f"per layer, absorbed projections: {line}" + (f"; mode: {mode}" if mode else ""))


def cmd_inspect(args) -> int:
    from mla_fx.errors import NoMLAError
    from mla_fx.passes.find_mla_sites import find_sites, no_mla_message

    loaded = _load_model(args)
    gm = loaded.capture()
    sites, rejected = find_sites(gm)
    if not sites:
        raise NoMLAError(no_mla_message(rejected, gm))
    print(f"{loaded.name}: {len(sites)} MLA site(s)")
    _print_sites(sites)
    for name, why in rejected.items():
        print(f"not MLA: {name}: {why}")
    return 0


def _dtypes(args, loaded) -> list[torch.dtype]:
    from mla_fx.api import default_dtypes, parse_dtypes

    return parse_dtypes(args.dtypes) if args.dtypes else default_dtypes(loaded)


def _same_path(a: Path, b) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.absolute() == b.absolute() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _check_absorb_outputs(args) -> None:
    """Before any work: -o is a .pt2 that can be written and is neither MODEL nor --report."""
    from mla_fx.outputs import check_writable

    if args.no_check and args.check_each_pass:
        raise MLAFXError("--check-each-pass checks numerics; it cannot go with --no-check")
    for flag, path in (("-o", args.output), ("--report", args.report)):
        if path is not None and _same_path(path, args.model):
            raise MLAFXError(f"{flag} {path} is MODEL itself; choose another output path")
    if args.report is not None and _same_path(args.report, args.output):
        raise MLAFXError(f"--report and -o are the same file ({args.output})")
    check_writable(args.output, directory=False, what="the program")
    if args.report is not None:
        check_writable(args.report, directory=False, what="the report")
    if args.dump_graphs is not None:
        check_writable(args.dump_graphs, directory=True, what="the graphs")


def cmd_absorb(args) -> int:
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.api import Progress, absorb_and_check, write_outputs

    if args.output.suffix != ".pt2":
        return _absorb_checkpoint(args)
    _check_absorb_outputs(args)
    progress = Progress(args.quiet)
    progress(f"loading {args.model}")
    loaded = _load_model(args)
    config = AbsorbConfig(mode=args.mode)
    check = not args.no_check
    dtypes = _dtypes(args, loaded)  # bad names fail before the work
    run = absorb_and_check(loaded, config, check=check, each_pass=args.check_each_pass,
                           generate_tokens=args.generate, dump_graphs=args.dump_graphs, progress=progress)
    print(f"{loaded.name}: {len(run.result.sites)} MLA layer(s) rewritten, mode {run.result.mode}")
    _print_sites(run.result.sites, run.result.mode)
    comparisons = list(run.comparisons)
    if check:
        extra = [d for d in dtypes if d != loaded.dtype]
        for dtype in extra:
            comparisons += absorb_and_check(loaded, config, dtype, each_pass=args.check_each_pass,
                                            progress=progress).comparisons
        run.comparisons = comparisons
        _print_comparisons(comparisons)
        if not run.passed and not args.force:
            raise CheckFailed(f"the rewrite does not match the original; {args.output} not written "
                              "(--force writes it anyway)")
    write_outputs(run, loaded, args.output, args.report, progress)
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


def _absorb_checkpoint(args) -> int:
    """-o FOLDER: the checkpoint streamed through the rewrite (mla_fx.absorbed_checkpoint)."""
    from mla_fx.absorb import AbsorbConfig, save_report
    from mla_fx.absorbed_checkpoint import plan_absorb, write_absorbed
    from mla_fx.api import Progress
    from mla_fx.checkpoint import Checkpoint
    from mla_fx.outputs import check_writable

    for flag, given in (("--dtypes", args.dtypes), ("--check-each-pass", args.check_each_pass),
                        ("--dump-graphs", args.dump_graphs)):
        if given:
            raise MLAFXError(f"{flag} is for a .pt2 output; an absorbed checkpoint is checked layer by layer in "
                             "float64 and end to end in its dtype")
    model = Path(args.model)
    if not model.is_dir():
        raise MLAFXError(f"-o {args.output} (a folder) writes an absorbed checkpoint, which needs MODEL to be a HF "
                         f"safetensors directory; {args.model} is not one (use -o OUT.pt2)")
    for flag, path in (("-o", args.output), ("--report", args.report)):
        if path is not None and _same_path(path, model):
            raise MLAFXError(f"{flag} {path} is MODEL itself; choose another output path")
    check_writable(args.output, directory=True, what="the absorbed checkpoint")
    if args.report is not None:
        check_writable(args.report, directory=False, what="the report")
    progress = Progress(args.quiet)
    checkpoint = Checkpoint(model)
    progress(f"capturing {model} with meta weights ({len(checkpoint.shards)} shard(s), "
             f"{checkpoint.nbytes() / 2**30:.2f} GiB) and rewriting it")
    plan = plan_absorb(checkpoint, AbsorbConfig(mode=args.mode))
    if plan.structure.note:
        print(f"note: {plan.structure.note}")
    print(f"{model}: {len(plan.result.sites)} MLA layer(s) rewritten, mode {plan.result.mode}; "
          f"{len(plan.new)} new weight(s), {len(plan.dropped)} tensor(s) no longer read")
    _print_sites(plan.result.sites, plan.result.mode)
    for change in plan.dtype_changes():
        print(f"dtype: {change['key']} is {change['dtype']}, computed from "
              + ", ".join(f"{k} ({d})" for k, d in change["from"].items()))

    def judge(comparisons, where: str) -> None:
        plan.checks += [c.to_dict() for c in comparisons]
        _print_comparisons(comparisons)
        if not all(c.passed for c in comparisons) and not args.force:
            raise CheckFailed(f"the rewrite does not match the original ({where}); {args.output} not written "
                              "(--force writes it anyway)")

    check_layers = verify = None
    if not args.no_check:
        from mla_fx.checkpoint_checks import end_to_end_check, layer_checks

        def check_layers() -> None:
            progress("checking every layer's attention in float64 on its own weights")
            judge(layer_checks(plan, args.quiet), "per layer")

        def verify(folder: Path) -> None:
            progress("checking the written checkpoint end to end")
            result = end_to_end_check(plan, folder, int(args.check_memory * 2**30))
            if isinstance(result, str):
                print(result)
                plan.checks.append({"name": "end to end", "skipped": result})
            else:
                judge(result, "end to end")

    write_absorbed(plan, args.output, progress, quiet=args.quiet, alongside=check_layers, before_commit=verify,
                   shard_bytes=max(int(args.max_shard_size * 1e9), 1))
    if args.report is not None:
        save_report(plan.manifest(), args.report)
    print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


def _print_comparisons(comparisons) -> None:
    from mla_fx.check import summary

    for c in comparisons:
        print(c.line())
    print(summary(comparisons))


def _check_onnx(args, loaded, progress):
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.check_backends import check_backends
    from mla_fx.inference import build_programs
    from mla_fx.ort_backend import OnnxBackend
    from mla_fx.torch_backend import TorchBackend

    onnx_backend = OnnxBackend(args.onnx)
    progress("building the rewritten inference programs")
    programs = build_programs(loaded, AbsorbConfig(mode=args.mode))
    if onnx_backend.cache != programs.cache or onnx_backend.vocab_size != programs.vocab_size:
        widths = [c.width for c in onnx_backend.cache], [c.width for c in programs.cache]
        raise MLAFXError(f"{args.onnx} was exported from another model (cache widths {widths[0]}, "
                         f"vocab {onnx_backend.vocab_size}; MODEL has {widths[1]}, {programs.vocab_size})")
    progress(f"comparing original vs rewritten vs ONNX Runtime ({args.decode_steps} decode steps)")
    return check_backends(loaded.reference(), [("rewritten", TorchBackend(programs)), ("onnxruntime", onnx_backend)],
                          token_prompts(loaded), args.decode_steps, programs.dtype)


def cmd_check(args) -> int:
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.api import Progress, absorb_and_check, check_generation_fits, prompts
    from mla_fx.check import compare_generation, compare_logits, random_inputs
    from mla_fx.loading import load_model
    from mla_fx.outputs import check_writable

    if args.dump_graphs is not None:
        check_writable(args.dump_graphs, directory=True, what="the graphs")
    progress = Progress(args.quiet)
    if args.trt is not None:  # before the model loads: say what is missing, or what the folder is not
        from mla_fx.export.tensorrt_engine import require_cuda
        from mla_fx.export.tensorrt_plugin import require_tensorrt
        from mla_fx.products import read_engine_manifest

        require_tensorrt()
        require_cuda()
        read_engine_manifest(args.trt)
    loaded = _load_model(args)
    comparisons = []
    if args.trt is not None:
        from mla_fx.check_backends import check_backends
        from mla_fx.trt_backend import TensorRTBackend

        backend = TensorRTBackend(args.trt)
        dtype = getattr(torch, backend.manifest["dtype"])
        comparisons += check_backends(loaded.to(dtype).reference(), [("tensorrt", backend)], token_prompts(loaded),
                                      args.decode_steps, dtype)
    if args.onnx is not None:
        comparisons += _check_onnx(args, loaded, progress)
    if args.rewritten is not None:
        rewritten = load_model(args.rewritten)
        if rewritten.program is None:
            raise MLAFXError(f"--rewritten {args.rewritten} is not a torch.export program (.pt2)")
        if rewritten.vocab_size != loaded.vocab_size:
            raise MLAFXError(f"--rewritten {args.rewritten} was made from another model (vocab "
                             f"{rewritten.vocab_size}; MODEL has {loaded.vocab_size})")
        check_generation_fits(loaded, args.generate)
        dtype = rewritten.dtype
        reference, candidate = loaded.to(dtype).reference(), rewritten.program.module()
        comparisons += compare_logits(reference, candidate, random_inputs(loaded.vocab_size), dtype)
        for label, prompt in prompts(loaded)[: 1 if args.generate else 0]:
            comparisons.append(compare_generation(reference, candidate, prompt, args.generate, label))
    if args.trt is None and args.onnx is None and args.rewritten is None:
        for i, dtype in enumerate(_dtypes(args, loaded)):
            run = absorb_and_check(loaded, AbsorbConfig(mode=args.mode), dtype, each_pass=args.check_each_pass,
                                   generate_tokens=args.generate if i == 0 else 0,
                                   dump_graphs=args.dump_graphs, progress=progress)
            comparisons += run.comparisons
    if not comparisons:
        raise MLAFXError("nothing was compared (give --dtypes, or --generate N > 0)")
    _print_comparisons(comparisons)
    return 0 if all(c.passed for c in comparisons) else 1


def _print_cache(manifest) -> None:
    print(f"{'layer':>5} {'latent values':>14} {'latent B/tok':>13} {'expanded K/V B/tok':>19} "
          f"{'HF transformers B/tok':>22}")
    for row in manifest["cache_bytes_per_token"]:
        print(f"{row['layer']:>5} {row['latent_values']:>14} {row['latent_bytes']:>13} "
              f"{row['expanded_kv_bytes']:>19} {row['hf_transformers_bytes']:>22}"
              + (f"  + {row['index_key_bytes']} B/tok indexer keys" if "index_key_bytes" in row else ""))
    crossover = manifest.get("crossover_tokens") or []
    if crossover:
        print(f"cache dtype {manifest['dtype']}; HF transformers caches the latent too but re-expands it through "
              f"kv_b every step. Un-absorbed attention is cheaper above {crossover[0]:.1f} new tokens over a long "
              "cached prefix; a prompt with no prefix runs the prefill program.")


def cmd_export(args) -> int:
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.api import Progress
    from mla_fx.export.onnx import export_onnx
    from mla_fx.inference import build_programs

    if args.onnx == args.trt:
        raise MLAFXError("choose one output format: --onnx or --trt")
    if args.trt:
        from mla_fx.export.tensorrt_engine import require_cuda
        from mla_fx.export.tensorrt_plugin import require_tensorrt

        require_tensorrt()  # before any work: say what is missing
        require_cuda()
        if args.plugin == "aot":
            from mla_fx.export.tensorrt_engine import plugin_ptx_version

            plugin_ptx_version(args.ptx_version)
        elif args.ptx_version is not None:
            raise MLAFXError("--ptx-version applies to the aot plugin (the jit plugin compiles on the GPU it runs on)")
    if args.opset < 23:
        raise MLAFXError(f"--opset {args.opset}: the exported attention needs opset 23 or later")
    from mla_fx.outputs import check_writable

    check_writable(args.output, directory=True, what="the export")
    progress = Progress(args.quiet)
    dtype = getattr(torch, args.dtype or ("float16" if args.trt else "float32"))
    checkpoint = None if args.trt else _streamable_checkpoint(args)
    if checkpoint is not None:
        try:
            return _export_checkpoint(args, checkpoint, dtype, progress)
        except UnstreamableCheckpoint:
            from mla_fx.checkpoint_checks import machine_memory

            if checkpoint.numel() * dtype.itemsize * 3 > machine_memory() // 2:
                raise
            progress("its weights cannot be read one at a time; it fits in memory, so it is loaded whole")
    progress(f"loading {args.model}")
    loaded = _load_model(args)
    loaded = loaded.to(dtype)
    progress("building the step (absorbed) and prefill (un-absorbed) programs")
    programs = build_programs(loaded, AbsorbConfig(mode=args.mode))
    tokenizer = "bytes" if loaded.source == "builtin" else None
    if args.trt:
        return _export_trt(args, loaded, programs, tokenizer, progress)
    check = not args.no_check and dtype != torch.bfloat16

    def verify(folder: Path) -> None:
        """ONNX Runtime against the original, on the finished export before it replaces -o."""
        _check_export(args, loaded, folder, progress)

    manifest = export_onnx(programs, args.output, attention=args.attention, opset=args.opset,
                           model_name=loaded.name, tokenizer=tokenizer, progress=progress, quiet=args.quiet,
                           verify=verify if check else None)
    _print_export(args, loaded.name, programs, manifest, dtype)
    return 0


def _streamable_checkpoint(args):
    """MODEL as a HF safetensors checkpoint whose export streams its weights, else None (loaded whole)."""
    from mla_fx.checkpoint import Checkpoint

    model = Path(args.model)
    if args.config is not None or not model.is_dir() or not any(model.glob("*.safetensors")):
        return None
    from mla_fx.models.reference import MODEL_TYPE

    config = model / "config.json"
    try:
        if not config.is_file() or json.loads(config.read_text()).get("model_type") == MODEL_TYPE:
            return None  # not a HF checkpoint (an mla-fx reference model directory loads whole)
    except (OSError, ValueError) as e:
        raise MLAFXError(f"{config}: not readable as JSON: {e}") from e
    return Checkpoint(model)


def _export_checkpoint(args, checkpoint, dtype: torch.dtype, progress) -> int:
    """A HF checkpoint of any size: programs built on its structure (meta weights), each weight read from the
    shards when it is written; the ONNX Runtime check runs where the original fits in --check-memory."""
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.checkpoint_checks import machine_memory
    from mla_fx.export.onnx import export_onnx
    from mla_fx.inference import plan_programs

    progress(f"capturing {checkpoint.directory} with meta weights ({len(checkpoint.shards)} shard(s), "
             f"{checkpoint.nbytes() / 2**30:.2f} GiB) and building the step and prefill programs")
    programs = plan_programs(checkpoint, AbsorbConfig(mode=args.mode), dtype)
    if programs.note:
        print(f"note: {programs.note}")
    # the original in memory, and ONNX Runtime's two sessions over the exported weights
    need = checkpoint.numel() * dtype.itemsize * 3
    budget = min(int(args.check_memory * 2**30), machine_memory() // 2)
    skipped = None
    if args.no_check or dtype == torch.bfloat16:
        verify = None
    elif need > budget:
        verify = None
        skipped = (f"ONNX Runtime check skipped: it would hold {need / 2**30:.1f} GiB (the original and two "
                   f"sessions in {str(dtype).removeprefix('torch.')}), more than its {budget / 2**30:.1f} GiB "
                   "budget (--check-memory); the export's weights were read from the checkpoint as the graph names "
                   "them, shapes and sizes checked")
    else:
        def verify(folder: Path) -> None:
            progress(f"loading {args.model} to check the export against it")
            _check_export(args, _load_model(args).to(dtype), folder, progress)

    manifest = export_onnx(programs, args.output, attention=args.attention, opset=args.opset,
                           model_name=str(args.model), progress=progress, quiet=args.quiet, verify=verify)
    if skipped:
        print(skipped)
    _print_export(args, str(args.model), programs, manifest, dtype)
    return 0


def _check_export(args, loaded, folder: Path, progress) -> None:
    from mla_fx.check_backends import check_backends
    from mla_fx.ort_backend import OnnxBackend

    progress(f"checking ONNX Runtime against the original ({args.decode_steps} decode steps)")
    backend = OnnxBackend(folder, ["CPUExecutionProvider"])
    comparisons = check_backends(loaded.reference(), [("onnxruntime", backend)], token_prompts(loaded),
                                 args.decode_steps, loaded.dtype)
    _print_comparisons(comparisons)
    if not all(c.passed for c in comparisons):
        raise CheckFailed(f"ONNX Runtime does not match the original; {args.output} not written")


def _print_export(args, name: str, programs, manifest, dtype: torch.dtype) -> None:
    print(f"{name}: {len(programs.sites)} MLA layer(s), mode {programs.mode}, wrote {args.output}/"
          f"{{step,prefill}}.onnx")
    _print_cache(manifest)
    if dtype == torch.bfloat16 and not args.no_check:
        print("ONNX Runtime has no bfloat16 kernels on CPU: check skipped (TensorRT runs bf16 engines)")


def _export_trt(args, loaded, programs, tokenizer, progress) -> int:
    import tempfile

    from mla_fx.check_backends import check_backends
    from mla_fx.export.onnx import export_onnx
    from mla_fx.export.tensorrt_engine import build_engines
    from mla_fx.trt_backend import TensorRTBackend

    def verify(folder: Path) -> None:
        """TensorRT against the original, on the finished engines before they replace -o."""
        comparisons = check_backends(loaded.reference(), [("tensorrt", TensorRTBackend(folder))],
                                     token_prompts(loaded), args.decode_steps, programs.dtype)
        _print_comparisons(comparisons)
        if not all(c.passed for c in comparisons):
            raise CheckFailed(f"TensorRT does not match the original; {args.output} not written")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp) / "onnx"
        export_onnx(programs, onnx_dir, attention="custom", opset=args.opset, model_name=loaded.name,
                    tokenizer=tokenizer, progress=progress)
        build_engines(onnx_dir, args.output, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                      max_cache=args.max_cache, implementation=args.plugin, ptx_version=args.ptx_version,
                      progress=progress,
                      verify=None if args.no_check else verify)
    print(f"{loaded.name}: wrote TensorRT engines to {args.output}/{{step,prefill}}.engine")
    return 0


def _open_backend(directory: Path, provider: str = "auto"):
    """An ONNX export runs in ONNX Runtime, a TensorRT folder in TensorRT."""
    from mla_fx.products import ENGINE_MANIFEST

    if (Path(directory) / ENGINE_MANIFEST).is_file():
        from mla_fx.trt_backend import TensorRTBackend

        return TensorRTBackend(directory)
    from mla_fx.ort_backend import OnnxBackend

    providers = {"auto": None, "cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}[provider]
    if provider == "cuda":
        from mla_fx.ort_backend import cuda_available

        if not cuda_available():
            raise MLAFXError("--provider cuda: no CUDA device, or onnxruntime without its CUDA provider, here")
    return OnnxBackend(directory, providers)


def cmd_generate(args) -> int:
    from mla_fx.models.tokenizer import decode, encode
    from mla_fx.runtime import generate

    backend = _open_backend(args.export_dir, args.provider)
    text = backend.manifest.get("tokenizer") == "bytes"
    if args.prompt and not text:
        raise MLAFXError(f"{args.export_dir} has no tokenizer mla-fx can run; give prompts as --ids 1,2,3")
    try:
        prompts = [encode(p) for p in args.prompt] + [[int(t) for t in i.split(",")] for i in args.ids]
    except ValueError as e:
        raise MLAFXError(f"--ids takes comma-separated integers: {e}") from e
    if not prompts:
        raise MLAFXError("give at least one --prompt TEXT or --ids 1,2,3")
    bad = sorted({t for p in prompts for t in p if not 0 <= t < backend.vocab_size})
    if bad:
        raise MLAFXError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {backend.vocab_size})")
    max_seq = backend.manifest.get("max_seq")
    longest = max(len(p) for p in prompts)
    if max_seq and longest + args.max_new_tokens > max_seq:
        raise MLAFXError(f"a {longest}-token prompt plus {args.max_new_tokens} new tokens passes the model's "
                         f"{max_seq} positions; use --max-new-tokens {max(max_seq - longest, 0)} or less")
    outs = generate(backend, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    seed=args.seed)
    for prompt, new in zip(prompts, outs, strict=True):
        print(decode(prompt + new) if text else ",".join(map(str, prompt + new)))
    return 0


def _quiet_libraries() -> None:
    """-q: no progress bars or advisory warnings from transformers and torch.onnx either."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the suite parses its own options (--quick, --out, --only)
        from mla_fx import bench

        command, handler = "bench", lambda: bench.main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command = args.command
        handler = {"absorb": cmd_absorb, "check": cmd_check, "inspect": cmd_inspect, "export": cmd_export,
                   "generate": cmd_generate}[command]
        handler = functools.partial(handler, args)
        if getattr(args, "quiet", False):
            _quiet_libraries()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # torch.export internals
    warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used")  # torch.onnx internals
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return handler()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: outputs are written all or nothing, so nothing is left
        print(f"mla-fx {command}: interrupted; no output written (an earlier output is kept)", file=sys.stderr)
        return 130
    except MLAFXError as e:
        print(f"mla-fx {command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file or folder the user named that cannot be read or written
        print(f"mla-fx {command}: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad option values (dtype names, modes)
        print(f"mla-fx {command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
