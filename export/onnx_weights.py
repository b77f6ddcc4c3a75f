"""The weights of exported ONNX programs, written once each into one external-data file.

step.onnx (absorbed) and prefill.onnx (un-absorbed) read mostly the same weights: embeddings, norms, query and
latent projections, experts, lm_head. The exporter leaves each weight a named input of its graph (the program's
parameter name; :func:`.onnx.lower_program`); here every weight is read from its program (`value(program,
parameter)`: a tensor in memory, or one computed from a checkpoint's shards), laid out as the graph reads it
(a folded Transpose), written into WEIGHTS once per distinct source and layout, and bound as an external-data
initializer of every model that reads it. Only the weights the absorption changes (W_UK/W_UV in step, kv_b_proj
in prefill) are stored for one model alone. One weight is in memory at a time, so a model of any size exports in
the memory of its largest tensor. Constants the optimizer folded (shapes, masks) larger than INLINE_BYTES are
written too; offsets are aligned to ALIGN bytes, so ONNX Runtime can map them; protobuf's 2 GiB cap never applies.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import onnx
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import from_torch_dtype

from mla_fx.errors import MLAFXError

if TYPE_CHECKING:
    from .onnx import OnnxProgram

WEIGHTS = "weights.data"
INLINE_BYTES = 1024  # smaller initializers (shapes, scalars) stay in the model
ALIGN = 4096


class StoredWeight(NamedTuple):
    """A weight as an exported graph reads it: the program's parameter, permuted by `perm` if not None."""

    parameter: str
    perm: tuple[int, ...] | None

    def layout(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor if self.perm is None else tensor.permute(self.perm)).contiguous()


class WeightSource(Protocol):
    """Where the weights come from (:class:`mla_fx.inference.InferencePrograms`)."""

    def weight(self, program: str, parameter: str) -> torch.Tensor: ...

    def weight_parts(self, program: str, parameter: str) -> Iterable[torch.Tensor]: ...

    def weight_identity(self, program: str, parameter: str) -> Hashable | None:
        """A key equal for two parameters known to hold the same tensor; None: compare their bytes."""


def bind_inline(program: OnnxProgram, value: Callable[[str], torch.Tensor]) -> None:
    """Every weight of `program` inline in its model (small models only: protobuf's 2 GiB cap)."""
    for name, weight in program.weights.items():
        _bind(program.model, name, ir.tensor(weight.layout(value(weight.parameter).detach()), name=name))


def _bind(model: ir.Model, name: str, tensor: ir.TensorProtocol) -> None:
    (value,) = [v for v in model.graph.inputs if v.name == name]
    model.graph.inputs.remove(value)
    value.const_value = tensor
    model.graph.register_initializer(value)


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _nbytes(value: ir.Value) -> int:
    return int(value.dtype.itemsize * math.prod(value.shape.numpy()))


class _WeightsFile:
    """WEIGHTS being written: each distinct tensor once, at an aligned offset; `shared` counts the bytes bound
    again from a copy already written."""

    def __init__(self, folder: Path, bar):
        self.folder, self.bar = folder, bar
        self.file = open(folder / WEIGHTS, "wb")
        self.placed: dict[Hashable, tuple[int, int]] = {}  # source (or content) -> (offset, length)
        self.shared = 0

    def place(self, key: Hashable, parts: Callable[[], Iterable[torch.Tensor | memoryview]]) -> tuple[int, int]:
        """(offset, length) of `key`'s bytes: written now from `parts()`, one after the other, unless already."""
        if key in self.placed:
            self.shared += self.placed[key][1]
            self.bar.update(self.placed[key][1])
            return self.placed[key]
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        for part in parts():
            data = _raw(part) if isinstance(part, torch.Tensor) else part
            self.file.write(data)
            self.bar.update(len(data))
        self.placed[key] = offset, self.file.tell() - offset
        return self.placed[key]

    def bind_weight(self, program: OnnxProgram, name: str, source: WeightSource) -> None:
        """The weight input `name` of `program` becomes an initializer: inline if small, else in WEIGHTS."""
        value = next(v for v in program.model.graph.inputs if v.name == name)
        weight = program.weights[name]
        if _nbytes(value) <= INLINE_BYTES:  # norms' scales, biases
            _bind(program.model, name, ir.tensor(weight.layout(source.weight(program.name, weight.parameter)),
                                                 name=name))
            return
        identity = source.weight_identity(program.name, weight.parameter)
        if identity is None:  # in memory: the same bytes are the same weight
            laid_out = weight.layout(source.weight(program.name, weight.parameter))
            key = (from_torch_dtype(laid_out.dtype), tuple(laid_out.shape), _digest(_raw(laid_out)))
            offset, length = self.place(key, lambda: [laid_out])
        elif weight.perm is None or weight.perm[0] == 0:  # in parts along dim 0 (one expert at a time)
            offset, length = self.place((identity, weight.perm), lambda: (
                weight.layout(part) for part in source.weight_parts(program.name, weight.parameter)))
        else:
            offset, length = self.place((identity, weight.perm), lambda: [
                weight.layout(source.weight(program.name, weight.parameter))])
        if length != _nbytes(value):
            raise MLAFXError(f"{name}: {length} bytes written where the {program.name} program reads {value.dtype} "
                             f"{list(value.shape)}")
        _bind(program.model, name, ir.ExternalTensor(WEIGHTS, offset, length, value.dtype, shape=value.shape,
                                                     name=name, base_dir=self.folder))

    def move_constant(self, init: ir.Value) -> None:
        """A constant the optimizer folded (a shape table, a mask) into WEIGHTS, if larger than INLINE_BYTES."""
        const = init.const_value
        if const is None or isinstance(const, ir.ExternalTensor) or const.nbytes <= INLINE_BYTES:
            return
        data = const.tobytes()
        offset, length = self.place((const.dtype, tuple(const.shape.numpy()), _digest(data)),
                                    lambda: [memoryview(data)])
        init.const_value = ir.ExternalTensor(WEIGHTS, offset, length, const.dtype, shape=const.shape, name=init.name,
                                             base_dir=self.folder)


def save_models(programs: Iterable[OnnxProgram], folder: Path, source: WeightSource,
                quiet: bool = True) -> dict[str, int]:
    """Write `folder/{name}.onnx` for each program and every weight into `folder/WEIGHTS`, each once. Returns
    `weights` (bytes of WEIGHTS) and `shared` (bytes read by more than one model, which separate files would
    repeat)."""
    from tqdm import tqdm

    programs = list(programs)
    total = sum(_nbytes(v) for p in programs for v in p.model.graph.inputs if v.name in p.weights)
    with tqdm(total=total, unit="B", unit_scale=True, desc="export: weights", disable=quiet) as bar:
        weights = _WeightsFile(folder, bar)
        with weights.file:
            for program in programs:
                for name in program.weights:
                    weights.bind_weight(program, name, source)
                for init in list(program.model.graph.initializers.values()):
                    weights.move_constant(init)
            weights.file.flush()
            os.fsync(weights.file.fileno())
            size = weights.file.tell()
    for program in programs:
        path = folder / f"{program.name}.onnx"
        ir.save(program.model, path)
        onnx.checker.check_model(str(path))
    return {"weights": size, "shared": weights.shared}
