"""Back-end that runs the inference programs (fx GraphModules) in PyTorch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mla_fx.inference import InferencePrograms


class TorchBackend:
    def __init__(self, programs: InferencePrograms):
        self.programs = programs
        self.cache = programs.cache
        self.vocab_size = programs.vocab_size
        self.float_dtype = torch.empty(0, dtype=programs.dtype).numpy().dtype if programs.dtype != torch.bfloat16 \
            else np.float32

    def _run(self, program, *arrays):
        with torch.no_grad():
            out = program(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        return out[0].float().numpy() if out[0].dtype == torch.bfloat16 else out[0].numpy(), \
            [t.numpy() for t in out[1:]]

    def prefill(self, input_ids, position_ids, attention_mask):
        return self._run(self.programs.prefill, input_ids, position_ids, attention_mask)

    def step(self, input_ids, position_ids, attention_mask, past: Sequence[np.ndarray]):
        return self._run(self.programs.step, input_ids, position_ids, attention_mask, *past)
