"""`mla_fx.load(OUT)`: what `mla-fx absorb` wrote, back as an input_ids -> logits module.

- `OUT.pt2`: the rewritten program with its weights;
- an absorbed checkpoint folder: the rewritten program (weights on meta) filled with the folder's tensors:
  the new weights by the keys `mla_fx.json` lists, every other weight as transformers loads the folder
  (its own key conversions, FP8 dequantized on CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mla_fx.absorbed_checkpoint import FORMAT, MANIFEST
from mla_fx.checkpoint import Checkpoint
from mla_fx.errors import LoadError
from mla_fx.outputs import read_manifest

HOW = "mla-fx absorb MODEL -o OUT"


def load(path: str | Path) -> nn.Module:
    """An input_ids [B, S] -> logits [B, S, vocab] module from an output of `mla-fx absorb`."""
    path = Path(path)
    if path.is_dir():
        return load_absorbed_checkpoint(path)
    from mla_fx.loading import load_model

    loaded = load_model(path)
    if loaded.program is None:
        raise LoadError(f"{path} is not an output of mla-fx absorb (a .pt2 program or an absorbed checkpoint folder)")
    return loaded.program.module()


def _original_weights(folder: Path, dtype: torch.dtype, expected_missing: set[str]) -> dict[str, torch.Tensor]:
    """The untouched weights by graph name, as transformers loads them (its key conversions; FP8 weights
    dequantized by mla-fx, see :mod:`mla_fx.transformers_loading`)."""
    from mla_fx import transformers_loading

    with transformers_loading.quiet_loading():  # its report lists the absorbed-away and the new weights
        model, _, info = transformers_loading.from_pretrained(folder, dtype=dtype)
    missing = set(info.get("missing_keys") or []) - expected_missing
    if missing:
        raise LoadError(f"{folder}: weights the program reads are missing: {', '.join(sorted(missing)[:3])}")
    return {f"model.{k}": v.detach() for k, v in model.state_dict().items()}


def load_absorbed_checkpoint(folder: Path) -> nn.Module:
    manifest = read_manifest(folder, MANIFEST, FORMAT, "absorbed checkpoint", HOW)
    dtype = getattr(torch, manifest["dtype"])
    program_file = folder / manifest["program"]
    if not program_file.is_file():
        raise LoadError(f"{folder}: the rewritten program {manifest['program']} is missing")
    program = torch.export.load(program_file)
    new = manifest["new_weights"]
    checkpoint = Checkpoint(folder)
    weights = _original_weights(folder, dtype, set(manifest["dropped"]))
    for name in list(program.state_dict):
        if name in new:
            value = checkpoint.tensor(new[name]["key"])
        elif name in weights:
            value = weights[name]
        else:
            raise LoadError(f"{folder}: no weight for the program's {name!r}")
        if tuple(value.shape) != tuple(program.state_dict[name].shape):
            raise LoadError(f"{folder}: {name} is {tuple(value.shape)}, the program expects "
                            f"{tuple(program.state_dict[name].shape)}")
        original = program.state_dict[name]
        program.state_dict[name] = nn.Parameter(value, requires_grad=False) if isinstance(original, nn.Parameter) \
            else value
    return program.module()
