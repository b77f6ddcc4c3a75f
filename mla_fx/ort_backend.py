"""Back-end that runs an mla-fx ONNX export with ONNX Runtime (CPU provider, CUDA where present)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mla_fx.errors import LoadError, require
from mla_fx.products import NUMPY_DTYPES, check_feeds, feeds, manifest_cache, read_onnx_manifest


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
        self.manifest = read_onnx_manifest(self.directory)
        missing = [k for k in ("dtype", "vocab_size", "programs", "layers") if k not in self.manifest]
        if missing or not all(isinstance(layer, dict) and "latent_dim" in layer for layer in self.manifest["layers"]):
            raise LoadError(f"{self.directory}: the manifest lacks {', '.join(missing) or 'layers[].latent_dim'}; "
                            "re-export with mla-fx export MODEL --onnx")
        self.cache = manifest_cache(self.manifest["layers"])
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
        check_feeds(self.cache, self.float_dtype, input_ids, position_ids, attention_mask, past)

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *present = self.sessions[name].run(None, feeds)
        return logits, present

    def prefill(self, input_ids, position_ids, attention_mask):
        self._check(input_ids, position_ids, attention_mask)
        return self._run("prefill", feeds(self.cache, input_ids, position_ids, attention_mask))

    def step(self, input_ids, position_ids, attention_mask, past: Sequence[np.ndarray]):
        self._check(input_ids, position_ids, attention_mask, past)
        return self._run("step", feeds(self.cache, input_ids, position_ids, attention_mask, past))
