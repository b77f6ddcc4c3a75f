"""Capture: nn.Module -> the ATen-level fx.GraphModule the passes work on.

torch.export (non-strict) then functionalization only (`run_decompositions({})`): in-place ops
such as HF's `new_empty` + `copy_` key assembly become `slice_scatter`, and composite ops the passes
match on (linear, scaled_dot_product_attention) are kept whole.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.export import Dim

from mla_fx.errors import MLAFXError

from .manager import run_passes


def sequence_dims(max_seq: int, dynamic_batch: bool = True, inputs: int = 1) -> tuple[dict[int, Dim], ...]:
    """Dynamic [batch, seq] for each of `inputs` token-shaped inputs (input_ids, position_ids, ...)."""
    dims = {1: Dim("seq", min=1, max=max_seq)}
    if dynamic_batch:
        dims[0] = Dim("batch", min=1, max=1024)
    return tuple(dict(dims) for _ in range(inputs))


def export_program(
    model: nn.Module, example: tuple[torch.Tensor, ...], max_seq: int
) -> torch.export.ExportedProgram:
    """torch.export with dynamic batch and sequence; falls back to dynamic sequence only; where the
    model constrains the sequence (DSA's top-k, a linear attention's chunks), to the range torch.export
    derives from the model's own code (Dim.AUTO)."""
    n = len(example)
    try:
        return torch.export.export(model, example, dynamic_shapes=sequence_dims(max_seq, inputs=n), strict=False)
    except Exception as e:  # some models specialise the batch size (e.g. masks built for B=1)
        first = e
    try:
        return torch.export.export(model, example, dynamic_shapes=sequence_dims(max_seq, False, n), strict=False)
    except Exception:
        if "Constraints violated" not in str(first):
            raise
    auto = tuple({0: Dim.AUTO, 1: Dim.AUTO} for _ in range(n))
    return torch.export.export(model, example, dynamic_shapes=auto, strict=False)


def graph_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """Functionalize and unlift: parameters become get_attr nodes the passes can replace; drop the
    capture's guards and dtype assertions; then the canonical forms the passes match
    (distribute_query_scale, split_query_like_key)."""
    # `.to(dtype)` leaves an assertion of the dtype seen at capture; the checks run graphs in other dtypes
    # (and float64 captures see float32 factories as float64), so the assertions go before anything runs
    asserts = [n for n in program.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    for node in asserts:
        program.graph.erase_node(node)
    if asserts:
        program.graph_module.recompile()
    gm = program.run_decompositions({}).module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            delattr(gm, "_guards_fn")
    gm.recompile()
    from mla_fx import pipelines  # it names this module's pipeline among the others

    return run_passes(gm, pipelines.CANONICAL)[0]


def capture(model: nn.Module, example: tuple[torch.Tensor, ...], max_seq: int = 4096) -> fx.GraphModule:
    try:
        with torch.no_grad():
            program = export_program(model, example, max_seq)
    except Exception as e:  # data-dependent control flow, unsupported ops, a forward that is not ids -> logits
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MLAFXError(f"torch.export could not capture {type(model).__name__} as input_ids -> logits: "
                         f"{type(e).__name__}: {first}") from e
    return graph_module(program)
