"""What mla-fx hands to other tools, in one low module that exporters and back-ends both import: the inference
programs' input and output names, the manifest files of an ONNX export and of a TensorRT engine folder, and the
check every back-end makes of the arrays a caller feeds the programs.

    step:    input_ids, position_ids, attention_mask, past_latent.{i}, past_index_keys.{j}
                 ->  logits, present_latent.{i}, present_index_keys.{j}
    prefill: input_ids, position_ids, attention_mask  ->  logits, present_latent.{i}, present_index_keys.{j}

The cache is one array per MLA layer i, [batch, tokens, d_c + d_r], and for a sparse (DSA) layer j whose indexer
selects the keys, one more [batch, tokens, index_head_dim] with the indexer's keys (:class:`CacheTensor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mla_fx.errors import MLAFXError
from mla_fx.outputs import read_manifest

TOKEN_INPUTS = ("input_ids", "position_ids", "attention_mask")
ONNX_MANIFEST, ONNX_FORMAT = "mla_fx_export.json", "mla-fx-onnx/1"
ENGINE_MANIFEST, ENGINE_FORMAT = "mla_fx_tensorrt.json", "mla-fx-tensorrt/1"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


@dataclass(frozen=True)
class CacheTensor:
    """One array of the cache: an MLA layer's latent rows, or a sparse layer's indexer keys."""

    kind: str  # "latent" | "index_keys"
    layer: int  # the MLA layer (site) it belongs to, counted over MLA layers
    width: int  # values per token

    @property
    def past(self) -> str:
        return f"past_{self.kind}.{self.layer}"

    @property
    def present(self) -> str:
        return f"present_{self.kind}.{self.layer}"


def cache_layout(latent_dims: Sequence[int], index_key_dims: Mapping[int, int] | None = None) -> list[CacheTensor]:
    """The cache in the programs' order: every layer's latent, then the indexer keys of the layers that hold them."""
    return ([CacheTensor("latent", i, d) for i, d in enumerate(latent_dims)]
            + [CacheTensor("index_keys", i, d) for i, d in sorted((index_key_dims or {}).items())])


def manifest_cache(layers: Sequence[Mapping]) -> list[CacheTensor]:
    """The cache an export's manifest describes (its `layers`: latent_dim, and index_key_dim for a sparse layer
    that holds its indexer's keys)."""
    return cache_layout([int(layer["latent_dim"]) for layer in layers],
                        {i: int(layer["index_key_dim"]) for i, layer in enumerate(layers) if "index_key_dim" in layer})


def input_names(program: str, cache: Sequence[CacheTensor]) -> list[str]:
    return list(TOKEN_INPUTS) + ([c.past for c in cache] if program == "step" else [])


def output_names(cache: Sequence[CacheTensor]) -> list[str]:
    return ["logits"] + [c.present for c in cache]


def feeds(cache: Sequence[CacheTensor], input_ids, position_ids, attention_mask,
          past: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """The programs' inputs by name (a step when `past` is given, else a prefill)."""
    named = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    named.update({c.past: p for c, p in zip(cache, past, strict=False)})
    return named


def read_onnx_manifest(directory: Path) -> dict[str, Any]:
    return read_manifest(directory, ONNX_MANIFEST, ONNX_FORMAT, "mla-fx ONNX export",
                         "mla-fx export MODEL --onnx -o DIR")


def read_engine_manifest(directory: Path) -> dict[str, Any]:
    return read_manifest(directory, ENGINE_MANIFEST, ENGINE_FORMAT, "mla-fx TensorRT folder",
                         "mla-fx export MODEL --trt -o DIR")


def check_feeds(cache: Sequence[CacheTensor], float_dtype: np.dtype, input_ids, position_ids, attention_mask,
                past: Sequence[np.ndarray] = ()) -> None:
    """A clear error for arrays the programs cannot take (rank, dtype, cache width, lengths)."""

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise MLAFXError(message)

    for name, a in (("input_ids", input_ids), ("position_ids", position_ids), ("attention_mask", attention_mask)):
        need(isinstance(a, np.ndarray) and a.ndim == 2, f"{name} must be a 2-D array [batch, tokens], "
             f"got shape {getattr(a, 'shape', None)}")
        need(a.dtype == np.int64, f"{name} must be int64, got {a.dtype}")
    b, s = input_ids.shape
    need(position_ids.shape == (b, s), f"position_ids {position_ids.shape} must match input_ids {(b, s)}")
    need(len(past) in (0, len(cache)), f"expected {len(cache)} past arrays ({', '.join(c.past for c in cache)}), "
         f"got {len(past)}")
    past_len = past[0].shape[1] if past else 0
    for c, p in zip(cache, past, strict=False):
        need(p.ndim == 3 and p.shape[0] == b, f"{c.past} must be [batch={b}, tokens, {c.width}], got {p.shape}")
        what = "d_c + d_r" if c.kind == "latent" else "index_head_dim"
        need(p.shape[2] == c.width, f"{c.past} has {p.shape[2]} values per token; this model caches {c.width} "
             f"({what})")
        need(p.shape[1] == past_len, f"{c.past} holds {p.shape[1]} tokens, {cache[0].past} {past_len}")
        need(p.dtype == float_dtype, f"{c.past} must be {float_dtype}, got {p.dtype}")
    need(attention_mask.shape == (b, past_len + s),
         f"attention_mask must be [batch, past + new] = {(b, past_len + s)}, got {attention_mask.shape}")
