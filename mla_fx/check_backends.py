"""Equivalence across back-ends: the original PyTorch model vs the rewritten inference programs
(PyTorch) vs ONNX Runtime, on a batch of prompts of different lengths (left-padded).

For each back-end: logits of every real prompt position (through the prefill program, and through the
step program with an empty past), then token-by-token decode teacher-forced with the original's
greedy continuation (logits per step), then greedy generation. The original runs without any cache,
one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mla_fx.check import Comparison, compare
from mla_fx.runtime import Backend, Session, generate

CROSS_BACKEND_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def default_prompts(vocab_size: int, lengths: Sequence[int] = (11, 4), seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def _reference_runs(model: Callable, prompts: Sequence[Sequence[int]], steps: int):
    """Per prompt: greedy continuation and the original's logits for prompt + continuation."""
    conts, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)])
            for _ in range(steps):
                nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
            conts.append(ids[0, len(p):].tolist())
            logits.append(model(ids)[0].float().numpy())
    return conts, logits


def check_backend(name: str, backend: Backend, prompts: Sequence[Sequence[int]], conts, ref_logits,
                  tol: float) -> list[Comparison]:
    out = []
    # TensorRT's step engine decodes one token per row: prompts go through its prefill engine only
    multi_token_step = getattr(backend, "step_new_tokens", None) is None
    for use_prefill in (True, False) if multi_token_step else (True,):
        session = Session(backend)
        logits = session.start(prompts, use_prefill)
        got = np.concatenate([logits[r, logits.shape[1] - len(p):] for r, p in enumerate(prompts)])
        want = np.concatenate([ref_logits[r][: len(p)] for r, p in enumerate(prompts)])
        program = "prefill program" if use_prefill else "step program, empty past"
        out.append(compare(f"prompt logits[{name}, {program}]", torch.from_numpy(want), torch.from_numpy(got), tol))
        if not use_prefill:
            continue
        steps = len(conts[0])
        got, want = [], []
        for i in range(steps - 1):
            logits = session.advance(np.array([c[i] for c in conts]))[:, -1]
            got.append(logits)
            want.append(np.stack([ref_logits[r][len(p) + i] for r, p in enumerate(prompts)]))
        out.append(compare(f"decode logits[{name}, {steps - 1} steps]", torch.from_numpy(np.stack(want)),
                           torch.from_numpy(np.stack(got)), tol))
    generated = generate(backend, prompts, len(conts[0]))
    same = generated == conts
    out.append(Comparison(f"generation[{name}, greedy]", (len(prompts), len(conts[0])), 0.0 if same else 1.0,
                          0.0 if same else 1.0, 1.0, 0.0, same,
                          f"{len(conts[0])} tokens x {len(prompts)} prompts identical" if same
                          else "greedy tokens differ from the original's"))
    return out


def check_backends(model: Callable, backends: Sequence[tuple[str, Backend]], prompts: Sequence[Sequence[int]],
                   decode_steps: int, dtype: torch.dtype) -> list[Comparison]:
    conts, ref_logits = _reference_runs(model, prompts, decode_steps + 1)  # the last token is never fed
    tol = CROSS_BACKEND_TOL[dtype]
    return [c for name, backend in backends for c in check_backend(name, backend, prompts, conts, ref_logits, tol)]
