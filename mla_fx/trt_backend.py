"""Back-end that runs mla-fx TensorRT engines (step.engine, prefill.engine) on torch CUDA tensors.

Same protocol as the ONNX Runtime back-end (mla_fx/runtime.py Backend): numpy in, numpy out. Engines
built with the ahead-of-time plugin need no Python plugin code; JIT-built ones register it first.
The step engine decodes one token per row; prompts go through prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mla_fx.errors import LoadError, MLAFXError
from mla_fx.export.tensorrt_engine import require_cuda
from mla_fx.export.tensorrt_plugin import register_plugin, require_tensorrt
from mla_fx.products import NUMPY_DTYPES, check_feeds, feeds, manifest_cache, read_engine_manifest

# trt.DataType name -> torch dtype name
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
                "INT8": "int8", "BOOL": "bool"}


class TensorRTBackend:
    def __init__(self, engine_dir: str | Path):
        trt = require_tensorrt()
        require_cuda()
        import torch

        self.torch = torch
        self.directory = Path(engine_dir)
        self.manifest = read_engine_manifest(self.directory)
        if self.manifest["dtype"] not in NUMPY_DTYPES:
            raise LoadError(f"the engines compute in {self.manifest['dtype']}, which numpy cannot hold")
        self.cache = manifest_cache(self.manifest["layers"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.float_dtype = np.dtype(NUMPY_DTYPES[self.manifest["dtype"]])
        self.limits = self.manifest["limits"]
        self.step_new_tokens = int(self.limits["step_new_tokens"])  # the step engine decodes one token per row
        if self.manifest.get("implementation") == "jit":
            register_plugin()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name, program in self.manifest["programs"].items():
            path = self.directory / program["file"]
            if not path.is_file():
                raise LoadError(f"{path} is missing from the engine folder")
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise LoadError(f"{path}: TensorRT {trt.__version__} could not load it (engines are tied to the "
                                "TensorRT version and GPU they were built with; rebuild)")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._empty = torch.zeros(16, dtype=torch.uint8, device="cuda")  # an address for zero-size tensors

    def _check_limits(self, input_ids: np.ndarray, past: Sequence[np.ndarray], step: bool) -> None:
        b, s = input_ids.shape
        cache = (past[0].shape[1] if past else 0) + s
        lim = self.limits
        if step and s != lim["step_new_tokens"]:
            raise MLAFXError(f"the TensorRT step engine takes {lim['step_new_tokens']} new token per row, got {s}; "
                             "run prompts through prefill")
        if b > lim["max_batch"]:
            raise MLAFXError(f"batch {b} exceeds the engines' max_batch {lim['max_batch']}; rebuild with a larger one")
        if not step and s > lim["max_new_tokens"]:
            raise MLAFXError(f"prompt of {s} tokens exceeds the prefill engine's max_new_tokens "
                             f"{lim['max_new_tokens']}")
        if cache > lim["max_cache"]:
            raise MLAFXError(f"{cache} cached tokens exceed the engines' max_cache {lim['max_cache']}")

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        torch = self.torch
        engine, context = self.engines[name], self.contexts[name]
        keep = []
        with torch.cuda.stream(self.stream):
            for key, array in feeds.items():
                t = torch.from_numpy(np.ascontiguousarray(array)).to("cuda", non_blocking=False)
                keep.append(t)
                context.set_input_shape(key, tuple(t.shape))
                context.set_tensor_address(key, t.data_ptr() if t.numel() else self._empty.data_ptr())
            outputs = {}
            for i in range(engine.num_io_tensors):
                key = engine.get_tensor_name(i)
                if key in feeds:
                    continue
                shape = tuple(context.get_tensor_shape(key))
                dtype = getattr(torch, TORCH_DTYPES[engine.get_tensor_dtype(key).name])
                t = torch.empty(shape, dtype=dtype, device="cuda")
                outputs[key] = t
                context.set_tensor_address(key, t.data_ptr() if t.numel() else self._empty.data_ptr())
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise MLAFXError(f"TensorRT failed to run the {name} engine")
        self.stream.synchronize()
        names = self.manifest["programs"][name]["outputs"]
        logits, *present = (outputs[n].cpu().numpy() for n in names)
        return logits, present

    def prefill(self, input_ids, position_ids, attention_mask):
        check_feeds(self.cache, self.float_dtype, input_ids, position_ids, attention_mask)
        self._check_limits(input_ids, (), step=False)
        return self._run("prefill", feeds(self.cache, input_ids, position_ids, attention_mask))

    def step(self, input_ids, position_ids, attention_mask, past: Sequence[np.ndarray]):
        check_feeds(self.cache, self.float_dtype, input_ids, position_ids, attention_mask, past)
        self._check_limits(input_ids, past, step=True)
        return self._run("step", feeds(self.cache, input_ids, position_ids, attention_mask, past))
