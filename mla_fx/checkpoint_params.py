"""The values of a structure's graph parameters, read from a checkpoint one tensor at a time.

A graph parameter is one checkpoint key (FP8 dequantized), or several that transformers fuses at load time (MoE
experts stored one by one; :func:`mla_fx.transformers_loading.fused_parameter`), read in parts. Values are in the
structure's dtype. (Buffers no checkpoint holds, RoPE's `inv_freq`, are in the programs with their values.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mla_fx.checkpoint import Checkpoint
from mla_fx.errors import LoadError
from mla_fx.structure import Structure
from mla_fx.transformers_loading import fused_parameter, stored_names


class CheckpointParameters:
    def __init__(self, checkpoint: Checkpoint, structure: Structure):
        self.checkpoint, self.structure = checkpoint, structure

    def _read(self, key: str) -> torch.Tensor:
        return self.checkpoint.tensor(key, self.structure.dtype)

    def _key(self, module_key: str) -> str:
        """The checkpoint key of a module parameter, under its own name or one transformers renames it from."""
        if self.checkpoint.has(module_key):
            return module_key
        names = stored_names(self.structure.conversion_keys, module_key)
        for name in names[1:]:
            try:
                return self.checkpoint.resolve(name)
            except LoadError:
                pass
        return self.checkpoint.resolve(names[0])

    def parts(self, name: str) -> Iterator[torch.Tensor]:
        """`name`'s value in parts along its first dimension (one part unless transformers fuses it)."""
        module_key = name.removeprefix("model.")
        try:
            key = self._key(module_key)
        except LoadError:
            fused = fused_parameter(self.structure.conversion_keys, module_key, list(self.checkpoint.shard_of),
                                    self._read)
            if fused is None:
                raise
            yield from fused.parts
            return
        yield self._read(key)

    def problems(self, parameters: dict[str, torch.Size]) -> list[str]:
        """What the checkpoint lacks for these graph parameters (name -> shape), before any weight is read."""
        found = []
        for name, shape in parameters.items():
            module_key = name.removeprefix("model.")
            try:
                stored = tuple(self.checkpoint.headers[self._key(module_key)].shape)
            except LoadError:
                try:
                    fused = fused_parameter(self.structure.conversion_keys, module_key,
                                            list(self.checkpoint.shard_of), self._read)
                except LoadError as e:
                    found.append(str(e))
                    continue
                if fused is None:
                    found.append(f"{module_key} is missing")
                elif fused.count != shape[0]:
                    found.append(f"{module_key} has {fused.count} experts where config.json makes it {shape[0]}")
                continue
            if stored != tuple(shape):
                found.append(f"{module_key} is {list(stored)} where config.json makes it {list(shape)}")
        return found

    def __call__(self, name: str) -> torch.Tensor:
        parts = list(self.parts(name))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
