"""The small trained MLA demo model that ships with mla-fx."""

from __future__ import annotations

import json
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
