"""mla-fx command line: absorb, check, inspect."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from mla_fx.errors import CheckFailed, MLAFXError


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
    p.add_argument("--generate", type=int, default=40, metavar="N",
                   help="also compare N greedily generated tokens (0: off; default 40)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("absorb", help="rewrite MLA into absorbed MQA over the latent cache; write a .pt2")
    _model_args(p)
    _check_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="output .pt2 (torch.export program)")
    p.add_argument("--report", type=Path, help="write a JSON report (sites, specs, costs, pass stats, checks)")
    p.add_argument("--dtypes", default=None,
                   help="dtypes to check in, comma separated (default: the model's dtype and float64)")
    p.add_argument("--no-check", action="store_true", help="skip the equivalence check (not recommended)")
    p.add_argument("--force", action="store_true", help="write the output even if the check fails")

    p = sub.add_parser("check", help="numerical equivalence of the rewrite (or of a written .pt2) with MODEL")
    _model_args(p)
    _check_args(p)
    p.add_argument("--rewritten", type=Path, help="compare this absorbed .pt2 instead of rewriting in memory")
    p.add_argument("--dtypes", default=None, help="comma separated (default float64,float32[,bfloat16])")

    p = sub.add_parser("inspect", help="list the MLA sites and their specs, without rewriting")
    _model_args(p)
    return parser


def _print_sites(result_or_sites, mode: str | None = None) -> None:
    from mla_fx.cost import mode_costs

    sites = result_or_sites
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
    from mla_fx.loading import load_model
    from mla_fx.passes.find_mla_sites import find_sites, no_mla_message

    loaded = load_model(args.model, config=args.config, trust_pickle=args.trust_pickle)
    sites, rejected = find_sites(loaded.capture())
    if not sites:
        raise NoMLAError(no_mla_message(rejected))
    print(f"{loaded.name}: {len(sites)} MLA site(s)")
    _print_sites(sites)
    for name, why in rejected.items():
        print(f"not MLA: {name}: {why}")
    return 0


def _dtypes(args, loaded) -> list[torch.dtype]:
    from mla_fx.api import default_dtypes, parse_dtypes

    return parse_dtypes(args.dtypes) if args.dtypes else default_dtypes(loaded)


def cmd_absorb(args) -> int:
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.api import Progress, absorb_and_check, write_outputs
    from mla_fx.loading import load_model

    progress = Progress(args.quiet)
    progress(f"loading {args.model}")
    loaded = load_model(args.model, config=args.config, trust_pickle=args.trust_pickle)
    config = AbsorbConfig(mode=args.mode)
    check = not args.no_check
    run = absorb_and_check(loaded, config, check=check, each_pass=args.check_each_pass,
                           generate_tokens=args.generate, dump_graphs=args.dump_graphs, progress=progress)
    print(f"{loaded.name}: {len(run.result.sites)} MLA layer(s) rewritten, mode {run.result.mode}")
    _print_sites(run.result.sites, run.result.mode)
    comparisons = list(run.comparisons)
    if check:
        extra = [d for d in _dtypes(args, loaded) if d != loaded.dtype]
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


def _print_comparisons(comparisons) -> None:
    from mla_fx.check import summary

    for c in comparisons:
        print(c.line())
    print(summary(comparisons))


def cmd_check(args) -> int:
    from mla_fx.absorb import AbsorbConfig
    from mla_fx.api import Progress, absorb_and_check, prompts
    from mla_fx.check import compare_generation, compare_logits, random_inputs
    from mla_fx.loading import load_model

    progress = Progress(args.quiet)
    loaded = load_model(args.model, config=args.config, trust_pickle=args.trust_pickle)
    comparisons = []
    if args.rewritten is not None:
        rewritten = load_model(args.rewritten)
        if rewritten.program is None:
            raise MLAFXError(f"--rewritten {args.rewritten} is not a torch.export program (.pt2)")
        dtype = rewritten.dtype
        reference, candidate = loaded.to(dtype).reference(), rewritten.program.module()
        comparisons += compare_logits(reference, candidate, random_inputs(loaded.vocab_size), dtype)
        for label, prompt in prompts(loaded)[: 1 if args.generate else 0]:
            comparisons.append(compare_generation(reference, candidate, prompt, args.generate, label))
    else:
        for i, dtype in enumerate(_dtypes(args, loaded)):
            run = absorb_and_check(loaded, AbsorbConfig(mode=args.mode), dtype, each_pass=args.check_each_pass,
                                   generate_tokens=args.generate if i == 0 else 0,
                                   dump_graphs=args.dump_graphs, progress=progress)
            comparisons += run.comparisons
    _print_comparisons(comparisons)
    return 0 if all(c.passed for c in comparisons) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # torch.export internals
    handler = {"absorb": cmd_absorb, "check": cmd_check, "inspect": cmd_inspect}[args.command]
    try:
        return handler(args)
    except MLAFXError as e:
        print(f"mla-fx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad option values (dtype names, modes)
        print(f"mla-fx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
