"""What mla-fx hands to other tools, in one low module that exporters and back-ends both import: the inference
programs' input and output names, the manifest files of an ONNX export and of a TensorRT engine folder, and the
check every back-end makes of the arrays a caller feeds the programs.

    step:    input_ids, position_ids, attention_mask, past_latent.{i}  ->  logits, present_latent.{i}
    prefill: input_ids, position_ids, attention_mask                   ->  logits, present_latent.{i}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mla_fx.errors import MLAFXError
from mla_fx.outputs import read_manifest

TOKEN_INPUTS = ("input_ids", "position_ids", "attention_mask")
ONNX_MANIFEST, ONNX_FORMAT = "mla_fx_export.json", "mla-fx-onnx/1"
ENGINE_MANIFEST, ENGINE_FORMAT = "mla_fx_tensorrt.json", "mla-fx-tensorrt/1"
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def past_name(layer: int) -> str:
    return f"past_latent.{layer}"


def present_name(layer: int) -> str:
    return f"present_latent.{layer}"


def input_names(program: str, layers: int) -> list[str]:
    return list(TOKEN_INPUTS) + ([past_name(i) for i in range(layers)] if program == "step" else [])


def output_names(layers: int) -> list[str]:
    return ["logits"] + [present_name(i) for i in range(layers)]


def feeds(input_ids, position_ids, attention_mask, past: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
    """The programs' inputs by name (a step when `past` is given, else a prefill)."""
    named = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    named.update({past_name(i): p for i, p in enumerate(past)})
    return named


def read_onnx_manifest(directory: Path) -> dict[str, Any]:
    return read_manifest(directory, ONNX_MANIFEST, ONNX_FORMAT, "mla-fx ONNX export",
                         "mla-fx export MODEL --onnx -o DIR")


def read_engine_manifest(directory: Path) -> dict[str, Any]:
    return read_manifest(directory, ENGINE_MANIFEST, ENGINE_FORMAT, "mla-fx TensorRT folder",
                         "mla-fx export MODEL --trt -o DIR")


def check_feeds(latent_dims: Sequence[int], float_dtype: np.dtype, input_ids, position_ids, attention_mask,
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
    need(len(past) in (0, len(latent_dims)), f"expected {len(latent_dims)} past_latent arrays, got {len(past)}")
    past_len = past[0].shape[1] if past else 0
    for i, (p, width) in enumerate(zip(past, latent_dims, strict=False)):
        need(p.ndim == 3 and p.shape[0] == b, f"{past_name(i)} must be [batch={b}, tokens, {width}], got {p.shape}")
        need(p.shape[2] == width, f"{past_name(i)} has {p.shape[2]} values per token; this model caches "
             f"{width} (d_c + d_r)")
        need(p.shape[1] == past_len, f"{past_name(i)} holds {p.shape[1]} tokens, {past_name(0)} {past_len}")
        need(p.dtype == float_dtype, f"{past_name(i)} must be {float_dtype}, got {p.dtype}")
    need(attention_mask.shape == (b, past_len + s),
         f"attention_mask must be [batch, past + new] = {(b, past_len + s)}, got {attention_mask.shape}")
