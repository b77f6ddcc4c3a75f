"""The small trained MLA demo model that ships with mla-fx, and a greedy generator for any ids->logits callable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from mla_fx.errors import LoadError
from mla_fx.models.reference import MODEL_TYPE, MLAConfig, MLAForCausalLM

TINY_MLA_DIR: Path = Path(__file__).resolve().parent / "data" / "tiny-mla"


def load_reference_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> MLAForCausalLM:
    """Load a directory holding config.json (model_type "mla_fx_reference") and model.safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise LoadError(f"{path}: expected config.json and model.safetensors")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("model_type") != MODEL_TYPE:
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise LoadError(f"{cfg_file}: model_type is {found!r}, expected {MODEL_TYPE!r}")
    try:
        config = MLAConfig.from_dict(raw)
    except ValueError as e:
        raise LoadError(f"{cfg_file}: {e}") from e
    model = MLAForCausalLM(config)
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors header errors, missing/unexpected keys, shape mismatches
        raise LoadError(f"{weights}: cannot load weights ({e})") from e
    return model.to(dtype).eval()


def load_tiny_mla(dtype: torch.dtype = torch.float32) -> MLAForCausalLM:
    """The shipped byte-level MLA LM trained on Python's docs (see scripts/train_tiny_mla.py)."""
    return load_reference_dir(TINY_MLA_DIR, dtype)


@torch.no_grad()
def greedy_generate(
    model_callable: Callable[[torch.Tensor], torch.Tensor], prompt_ids: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Greedy decoding that recomputes the whole sequence each step (no cache).

    model_callable maps ids [1, S] -> logits [1, S, V] (an nn.Module or an exported program's module).
    Returns [1, S + max_new_tokens]. Ties resolve to the lowest id (torch.argmax), so it is deterministic.
    """
    ids = prompt_ids
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    for _ in range(max_new_tokens):
        logits = model_callable(ids)
        nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True).to(ids.dtype)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
