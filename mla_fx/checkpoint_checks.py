"""The checks of an absorbed checkpoint: every layer's attention in float64 (always, one layer's weights in
memory at a time) and, where the model fits in memory, the whole model end to end in its dtype, judged against
the original in float64."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from mla_fx.absorbed_checkpoint import AbsorbPlan
from mla_fx.check import Comparison, compare_logits, random_inputs
from mla_fx.layer_check import check_layers
from mla_fx.models.wrappers import CausalLMLogits
from mla_fx.precision import in_dtype

# the end-to-end check holds the whole model three times; it runs where that fits in this budget (and in half the
# machine's memory), so that the absorb of a large checkpoint stays within a few GiB; every layer is checked anyway
END_TO_END_BUDGET = 4 << 30
CHECK_SHAPE = (2, 17)


def layer_checks(plan: AbsorbPlan, quiet: bool = False) -> list[Comparison]:
    from tqdm import tqdm

    structure = plan.structure
    ckpt = plan.checkpoint

    def fetch64(name: str) -> torch.Tensor:
        if name in structure.buffers:
            return structure.buffers[name].double()
        key = plan.graph_keys.get(name) or structure.checkpoint_key(name, ckpt)
        return ckpt.tensor(key, torch.float64)

    recipes = {w.name: w.recipe for w in plan.new}
    example = torch.randint(0, structure.vocab_size, CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    return check_layers(structure.graph, plan.result.gm, plan.result.sites, fetch64, recipes, example,
                        progress=lambda r: tqdm(r, desc="check: layers (float64)", unit="layer", disable=quiet))


def end_to_end_bytes(plan: AbsorbPlan) -> int:
    """Memory the end-to-end check holds: the original in float64 and in its dtype, the rewritten in its dtype."""
    size = torch.finfo(plan.structure.dtype).bits // 8
    return plan.checkpoint.numel() * (8 + 2 * size)


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def end_to_end_check(plan: AbsorbPlan, folder: Path, budget: int = END_TO_END_BUDGET) -> list[Comparison] | str:
    """Logits of the absorbed folder against the original checkpoint, or why the check was not run."""
    from mla_fx import transformers_loading
    from mla_fx.load_output import load_absorbed_checkpoint

    need, budget = end_to_end_bytes(plan), min(budget, machine_memory() // 2)
    if need > budget:
        return (f"end-to-end check skipped: it would hold {need / 2**30:.1f} GiB (the original in float64 and "
                f"{str(plan.structure.dtype).removeprefix('torch.')}, the rewritten), more than its "
                f"{budget / 2**30:.1f} GiB budget; the per-layer checks cover every layer")
    dtype = plan.structure.dtype
    source = plan.checkpoint.directory

    def original(d: torch.dtype) -> Callable:
        with transformers_loading.quiet_loading():
            model, _, _ = transformers_loading.from_pretrained(source, dtype=d)
        return in_dtype(CausalLMLogits(model.eval()), d)

    rewritten = load_absorbed_checkpoint(folder)
    exact = original(torch.float64) if dtype != torch.float64 else None
    reference = original(dtype)
    return compare_logits(reference, in_dtype(rewritten, dtype), random_inputs(plan.structure.vocab_size), dtype,
                          exact=exact)
