"""Numerical equivalence: reference vs candidate on the same inputs, one greppable line per output.

    PASSED | logits[float32 random 2x17] | max_abs=3.1e-06 rel_l2=4.2e-07 cos=1.000000 (tol 1e-05)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

# relative L2 tolerances per dtype (README: "Checks that mean something at depth")
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Low precision is judged against a float64 reference of the original: the rewrite may add at most
# ERROR_GROWTH times the error the original itself makes in that dtype, plus ERROR_FLOOR (relative L2).
# A fixed tolerance cannot do this: deeper or sharper models exceed it by chance, rewritten or not.
LOW_PRECISION = (torch.bfloat16, torch.float16)
ERROR_GROWTH, ERROR_FLOOR = 1.5, 1e-3
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


@dataclass
class Comparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float
    cosine: float
    tol: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        if self.detail:
            return f"{status} | {self.name} | {self.detail}"
        return (f"{status} | {self.name} | max_abs={self.max_abs:.3g} rel_l2={self.rel_l2:.3g} "
                f"cos={self.cosine:.6f} (tol {self.tol:g})")

    def to_dict(self) -> dict:
        return asdict(self)


def compare(name: str, reference: torch.Tensor, candidate: torch.Tensor, tol: float) -> Comparison:
    if reference.shape != candidate.shape:
        detail = f"shape mismatch: reference {tuple(reference.shape)}, candidate {tuple(candidate.shape)}"
        return Comparison(name, tuple(candidate.shape), float("inf"), float("inf"), 0.0, tol, False, detail)
    ref, cand = reference.detach().double().flatten(), candidate.detach().double().flatten()
    diff = cand - ref
    rel = rel_between(ref, cand)
    cos = torch.nn.functional.cosine_similarity(ref, cand, dim=0).item() if ref.numel() else 1.0
    finite = bool(torch.isfinite(cand).all())
    return Comparison(name, tuple(reference.shape), diff.abs().max().item() if ref.numel() else 0.0, rel, cos,
                      tol, finite and rel <= tol)


def compare_to_float64(name: str, exact: torch.Tensor, original: torch.Tensor, candidate: torch.Tensor
                       ) -> Comparison:
    """The candidate's error against the float64 original, next to the original's own error in the dtype."""
    if exact.shape != candidate.shape:
        return compare(name, exact, candidate, 0.0)

    flat_e, flat_o, flat_c = (t.detach().double().flatten() for t in (exact, original, candidate))
    own, err = rel_between(flat_e, flat_o), rel_between(flat_e, flat_c)
    limit = ERROR_GROWTH * own + ERROR_FLOOR
    cos = torch.nn.functional.cosine_similarity(flat_o, flat_c, dim=0).item() if flat_c.numel() else 1.0
    finite = bool(torch.isfinite(candidate).all())
    detail = (f"error vs float64 original: rewritten {err:.3g}, original {own:.3g} (limit {ERROR_GROWTH:g}x + "
              f"{ERROR_FLOOR:g} = {limit:.3g}); rewritten vs original rel_l2={rel_between(flat_o, flat_c):.3g}")
    return Comparison(name, tuple(exact.shape), (flat_c - flat_o).abs().max().item() if flat_c.numel() else 0.0,
                      err, cos, limit, finite and err <= limit, detail)


def rel_between(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    norm = reference.norm().item()
    return (candidate - reference).norm().item() / norm if norm > 0 else (candidate - reference).norm().item()


def random_inputs(vocab_size: int, shapes: Sequence[tuple[int, int]] = ((2, 17), (1, 5)),
                  seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"random {b}x{s}", torch.randint(0, vocab_size, (b, s), generator=g)) for b, s in shapes]


def compare_logits(reference: Callable, candidate: Callable, inputs: Sequence[tuple[str, torch.Tensor]],
                   dtype: torch.dtype, tol: float | None = None, exact: Callable | None = None
                   ) -> list[Comparison]:
    """Candidate vs reference logits in `dtype`; in low precision with `exact` (the original in float64),
    judged by the error each makes against it (compare_to_float64)."""
    tol = TOLERANCES[dtype] if tol is None else tol
    out = []
    with torch.no_grad():
        for label, ids in inputs:
            name = f"logits[{str(dtype).removeprefix('torch.')} {label}]"
            if exact is not None and dtype in LOW_PRECISION:
                out.append(compare_to_float64(name, exact(ids), reference(ids), candidate(ids)))
            else:
                out.append(compare(name, reference(ids), candidate(ids), tol))
    return out


def greedy(model: Callable, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy generation by recomputing the whole sequence (works for any ids -> logits callable)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def compare_generation(reference: Callable, candidate: Callable, prompt: torch.Tensor, new_tokens: int,
                       label: str = "greedy") -> Comparison:
    ref, cand = greedy(reference, prompt, new_tokens), greedy(candidate, prompt, new_tokens)
    same = torch.equal(ref, cand)
    first = None if same else int((ref != cand).any(0).nonzero()[0])
    detail = f"{new_tokens} tokens identical" if same else f"tokens differ from position {first} of {new_tokens}"
    return Comparison(f"generation[{label}]", tuple(ref.shape), 0.0 if same else 1.0, 0.0 if same else 1.0,
                      1.0, 0.0, same, detail)


def summary(comparisons: Sequence[Comparison]) -> str:
    failed = sum(not c.passed for c in comparisons)
    verdict = "all PASSED" if not failed else f"{failed} FAILED"
    return f"SUMMARY | {len(comparisons)} comparisons, {verdict}"
