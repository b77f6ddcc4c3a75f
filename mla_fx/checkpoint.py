"""A HF safetensors checkpoint read tensor by tensor (memory-mapped), never whole.

Reads `model.safetensors` or the shards that `model.safetensors.index.json` lists, and the DeepSeek-V3
FP8 format: float8_e4m3fn weights with a float32 `weight_scale_inv` per block
(`quantization_config = {quant_method: fp8, weight_block_size: [128, 128]}`), dequantized on request.
"""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mla_fx.errors import LoadError
from mla_fx.shards import DTYPES, Stored, stored_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # weight -> weight_scale_inv
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """FP8 [out, in] times its per-block scales [ceil(out/b0), ceil(in/b1)], in float32, rounded once to dtype
    (bit-equal to transformers' dequantization). A few block rows at a time: besides the result, memory holds
    float32 temporaries of those rows only (DeepSeek-V3's o_proj would take 1.4 GB of them at once)."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=dtype)
    step = block[0] * 8
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scale = scale_inv[start // block[0]: -(-stop // block[0])].float()
        scale = scale.repeat_interleave(block[0], 0)[: stop - start].repeat_interleave(block[1], 1)[:, :cols]
        out[start:stop] = (weight[start:stop].float() * scale).to(dtype)
    return out


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 (e4m3) quantization as DeepSeek-V3 ships it: per-block amax / 448 as `scale_inv`."""
    rows, cols = weight.shape
    br, bc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(br * block[0], bc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.reshape(br, block[0], bc, block[1])
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).reshape_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale_inv


class Checkpoint:
    """The tensors of a model directory, by name: which shard holds each, its dtype and shape, its values."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.config: dict[str, Any] = self._read_json(self.directory / "config.json")
        index = self.directory / INDEX
        if index.is_file():
            weight_map = self._read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise LoadError(f"{index}: no weight_map")
            self.shard_of: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE).is_file():
            self.shard_of = {k: SINGLE for k, _ in stored_tensors(self.directory / SINGLE)}
        else:
            raise LoadError(f"{self.directory} has no {SINGLE} or {INDEX}: not a safetensors checkpoint")
        missing = sorted({s for s in self.shard_of.values() if not (self.directory / s).is_file()})
        if missing:
            raise LoadError(f"{self.directory}: the index lists shards that are missing: {', '.join(missing[:3])}")

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{path}: not a readable JSON file ({e})") from e
        if not isinstance(data, dict):
            raise LoadError(f"{path}: expected a JSON object")
        return data

    def _open(self, shard: str):
        try:
            return safe_open(str(self.directory / shard), framework="pt")
        except Exception as e:
            raise LoadError(f"{self.directory / shard}: not a readable safetensors file ({e})") from e

    @cached_property
    def shards(self) -> list[str]:
        return sorted(set(self.shard_of.values()))

    @cached_property
    def headers(self) -> dict[str, Stored]:
        """Every tensor's dtype, shape and place, from the shards' headers (read once)."""
        return {k: v for shard in self.shards for k, v in stored_tensors(self.directory / shard)}

    @cached_property
    def fp8_block(self) -> tuple[int, int] | None:
        """The block size of a DeepSeek-V3-format FP8 checkpoint, None for any other."""
        q = self.config.get("quantization_config") or {}
        if q.get("quant_method") != "fp8":
            return None
        block = q.get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    @cached_property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype: config.json's `dtype` (`torch_dtype` before transformers 5), else that of
        the first floating tensor that is not FP8."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        for key in self.shard_of:
            dtype = self.raw_dtype(key)
            if dtype.is_floating_point and dtype not in FP8_DTYPES:
                return dtype
        return torch.float32

    def raw_dtype(self, key: str) -> torch.dtype:
        """The dtype `key` is stored in, read from the shard's header."""
        return DTYPES.get(self.headers[key].dtype, torch.uint8)

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def has(self, key: str) -> bool:
        return key in self.shard_of

    def raw(self, key: str) -> torch.Tensor:
        """The tensor as stored (FP8 stays FP8)."""
        if key not in self.shard_of:
            raise LoadError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        with self._open(self.shard_of[key]) as f:
            return f.get_tensor(key)

    def scale_key(self, key: str) -> str | None:
        """The `weight_scale_inv` of an FP8 weight, when this checkpoint has one for `key`."""
        scale = key + SCALE_SUFFIX
        return scale if self.fp8_block is not None and scale in self.shard_of else None

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The value of `key`: FP8 weights dequantized with their block scales; cast to `dtype` if given."""
        value = self.raw(key)
        scale = self.scale_key(key)
        if value.dtype in FP8_DTYPES:
            if scale is None:
                raise LoadError(f"{self.directory}: FP8 tensor {key!r} has no {key + SCALE_SUFFIX}")
            return dequantize_blocks(value, self.raw(scale), self.fp8_block, dtype or torch.bfloat16)
        return value if dtype is None else value.to(dtype)

    def numel(self) -> int:
        """Values in the checkpoint (from the shards' headers)."""
        return sum(math.prod(s.shape) for s in self.headers.values())

    def nbytes(self) -> int:
        return sum((self.directory / s).stat().st_size for s in self.shards)

    def resolve(self, module_key: str) -> str:
        """The checkpoint key of a module parameter: the same name, else the one key that ends like it, its
        leading components dropped one by one (a multimodal model's text decoder is stored under a prefix:
        `model.layers.0...` is `model.language_model.layers.0...`, `model.norm.weight` is
        `model.language_model.norm.weight`); a layer's key keeps `layers.N`, never one of several."""
        if module_key in self.shard_of:
            return module_key
        parts = module_key.split(".")
        last = parts.index("layers") if "layers" in parts else len(parts) - 2  # a layer's key keeps its index
        found: list[str] = []
        for start in range(last + 1):
            tail = ".".join(parts[start:])
            found = [k for k in self.shard_of if k.endswith("." + tail) or k == tail]
            if found:
                break
        if len(found) != 1:
            raise LoadError(f"{self.directory}: the model reads {module_key!r}, which is "
                            f"{'ambiguous' if found else 'not a key'} in the checkpoint")
        return found[0]
