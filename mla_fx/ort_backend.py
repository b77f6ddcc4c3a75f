"""Back-end that runs an mla-fx ONNX export with ONNX Runtime (CPU provider, CUDA where present)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mla_fx.errors import LoadError, MLAFXError, require
from mla_fx.export.onnx import read_export_manifest

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def default_providers(ort) -> list[str]:
    return (["CUDAExecutionProvider"] if cuda_available() else []) + ["CPUExecutionProvider"]


def cuda_available() -> bool:
    """ONNX Runtime's CUDA provider is installed and a CUDA device is present."""
    ort = require("onnxruntime", None, "Running an ONNX export")
    return "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class OnnxBackend:
    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None):
        ort = require("onnxruntime", None, "Running an ONNX export")
        self.directory = Path(directory)
        self.manifest = read_export_manifest(self.directory)
        missing = [k for k in ("dtype", "vocab_size", "programs", "layers") if k not in self.manifest]
        if missing or not all(isinstance(layer, dict) and "latent_dim" in layer for layer in self.manifest["layers"]):
            raise LoadError(f"{self.directory}: the manifest lacks {', '.join(missing) or 'layers[].latent_dim'}; "
                            "re-export with mla-fx export MODEL --onnx")
        self.latent_dims = [layer["latent_dim"] for layer in self.manifest["layers"]]
        self.vocab_size = int(self.manifest["vocab_size"])
        if self.manifest["dtype"] not in NUMPY_DTYPES:
            raise LoadError(f"{directory} holds {self.manifest['dtype']} programs; ONNX Runtime here runs "
                            f"{', '.join(NUMPY_DTYPES)} (bfloat16 exports are for TensorRT)")
        self.float_dtype = np.dtype(NUMPY_DTYPES[self.manifest["dtype"]])
        providers = list(providers) if providers else default_providers(ort)
        self.sessions = {}
        for name, program in self.manifest["programs"].items():
            path = self.directory / program["file"]
            if not path.is_file():
                raise LoadError(f"{path} is missing from the export")
            try:
                session = ort.InferenceSession(str(path), providers=providers)
            except Exception as e:
                reason = str(e).strip().splitlines()[0][:200]
                raise LoadError(f"{path}: ONNX Runtime cannot load it ({reason}); re-export with mla-fx export") from e
            names = {i.name for i in session.get_inputs()}
            expected = set(program.get("inputs", names))
            if names != expected:
                raise LoadError(f"{path} does not belong to this export: its inputs {sorted(names)} are not the "
                                f"manifest's {sorted(expected)}; re-export with mla-fx export")
            self.sessions[name] = session

    def _check(self, input_ids, position_ids, attention_mask, past: Sequence[np.ndarray] = ()) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise MLAFXError(message)

        for name, a in (("input_ids", input_ids), ("position_ids", position_ids), ("attention_mask", attention_mask)):
            need(isinstance(a, np.ndarray) and a.ndim == 2, f"{name} must be a 2-D array [batch, tokens], "
                 f"got shape {getattr(a, 'shape', None)}")
            need(a.dtype == np.int64, f"{name} must be int64, got {a.dtype}")
        b, s = input_ids.shape
        need(position_ids.shape == (b, s), f"position_ids {position_ids.shape} must match input_ids {(b, s)}")
        need(len(past) in (0, len(self.latent_dims)), f"expected {len(self.latent_dims)} past_latent arrays, "
             f"got {len(past)}")
        past_len = past[0].shape[1] if past else 0
        for i, (p, width) in enumerate(zip(past, self.latent_dims, strict=False)):
            need(p.ndim == 3 and p.shape[0] == b,
                 f"past_latent.{i} must be [batch={b}, tokens, {width}], got {p.shape}")
            need(p.shape[2] == width, f"past_latent.{i} has {p.shape[2]} values per token; this model caches "
                 f"{width} (d_c + d_r)")
            need(p.shape[1] == past_len, f"past_latent.{i} holds {p.shape[1]} tokens, past_latent.0 {past_len}")
            need(p.dtype == self.float_dtype, f"past_latent.{i} must be {self.float_dtype}, got {p.dtype}")
        need(attention_mask.shape == (b, past_len + s),
             f"attention_mask must be [batch, past + new] = {(b, past_len + s)}, got {attention_mask.shape}")

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *present = self.sessions[name].run(None, feeds)
        return logits, present

    def prefill(self, input_ids, position_ids, attention_mask):
        self._check(input_ids, position_ids, attention_mask)
        return self._run("prefill", {"input_ids": input_ids, "position_ids": position_ids,
                                     "attention_mask": attention_mask})

    def step(self, input_ids, position_ids, attention_mask, past: Sequence[np.ndarray]):
        self._check(input_ids, position_ids, attention_mask, past)
        feeds = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
        feeds.update({f"past_latent.{i}": p for i, p in enumerate(past)})
        return self._run("step", feeds)
