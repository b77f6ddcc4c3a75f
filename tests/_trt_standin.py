"""A stand-in for TensorRT's C extension (`tensorrt.so`, which needs libnvinfer and a GPU), so that
TensorRT's own Python plugin library (`tensorrt_bindings/plugin/`, from the tensorrt-cu12-bindings wheel)
runs here unchanged.

It replaces only what that library reaches through `import tensorrt as trt`: enums (DataType,
TensorFormat, PluginFieldType, ...), plain records (PluginField, PluginTensorDesc, Dims, ...), the empty
interface base classes the plugin classes derive from (IPluginV3, IPluginCreatorV3Quick, ...), the plugin
registry, and the builder's symbolic dimension expressions, which here are expression trees that
`evaluate` at concrete shapes (TensorRT evaluates them at each launch). Everything else (decorators,
validation of the registered functions, TensorDesc/ShapeExpr/SymInt32, autotune combinations, the
JIT/AOT plugin classes) is TensorRT's code. `install()` puts the stand-in in sys.modules as `tensorrt`
with the wheel's folder as its package path, so `import tensorrt.plugin` loads the real library.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types
from importlib import metadata

import numpy as np

BINDINGS_DIST = "tensorrt_cu12_bindings"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    HWC = 8


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


TensorRTPhase = enum.Enum("TensorRTPhase", "BUILD RUNTIME")
QuickPluginCreationRequest = enum.Enum("QuickPluginCreationRequest",
                                       "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT")
PluginArgType = enum.Enum("PluginArgType", "INT")
PluginArgDataType = enum.Enum("PluginArgDataType", "INT8 INT16 INT32")


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_OPS = {
    DimensionOperation.SUM: lambda a, b: a + b,
    DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max,
    DimensionOperation.MIN: min,
    DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b),
    DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b,
    DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(dtype: DataType):
    return _NP[dtype]


class IDimensionExpr:
    """A dimension expression: a constant, a named input dimension, or an operation on two expressions."""

    def __init__(self, op=None, args=(), value=None, name=None):
        self.op, self.args, self.value, self.name = op, tuple(args), value, name

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        return self.value

    def evaluate(self, dims: dict[str, int]) -> int:
        """The value at concrete input dimensions (what TensorRT computes at launch)."""
        if self.value is not None:
            return self.value
        if self.name is not None:
            return dims[self.name]
        a, b = (arg.evaluate(dims) for arg in self.args)
        return _OPS[self.op](a, b)


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        if not isinstance(value, int):
            raise TypeError(f"IExprBuilder.constant takes an int, got {type(value).__name__}")
        return IDimensionExpr(value=value)

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        if not isinstance(op, DimensionOperation) or not all(isinstance(x, IDimensionExpr) for x in (a, b)):
            raise TypeError(f"IExprBuilder.operation({op!r}, {a!r}, {b!r})")
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(value=_OPS[op](a.value, b.value))  # TensorRT folds constants too
        return IDimensionExpr(op, (a, b))


def symbol(name: str) -> IDimensionExpr:
    return IDimensionExpr(name=name)


class DimsExprs(list):
    def __init__(self, length_or_exprs=0):
        super().__init__([None] * length_or_exprs if isinstance(length_or_exprs, int) else length_or_exprs)


class Dims(list):
    MAX_DIMS = 8

    def __init__(self, shape=0):
        super().__init__([0] * shape if isinstance(shape, int) else shape)


class PluginField:
    """name, data (a numpy array, as TensorRT's binding returns it), type, size."""

    def __init__(self, name: str = "", data=None, type: PluginFieldType = PluginFieldType.UNKNOWN):
        self.name, self.type = name, type
        if isinstance(data, (bytes, bytearray)):
            data = np.frombuffer(bytes(data), dtype=np.int8)
        self.data = np.asarray(data if data is not None else [])
        self.size = self.data.size


class PluginFieldCollection(list):
    pass


class PluginTensorDesc:
    def __init__(self, dims=(), type: DataType = DataType.FLOAT, format: TensorFormat = TensorFormat.LINEAR,
                 scale: float = 1.0):
        self.dims, self.type, self.format, self.scale = Dims(list(dims)), type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc: PluginTensorDesc, min=(), opt=(), max=()):
        self.desc, self.min, self.opt, self.max = desc, Dims(list(min)), Dims(list(opt)), Dims(list(max))


class _Interface:
    def __init__(self):
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class ISymExpr(_Interface):
    pass


class ITensor:
    pass


class Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

    def __init__(self, severity=WARNING):
        self.severity = severity

    def log(self, severity, message) -> None:
        pass


class PluginRegistry:
    def __init__(self):
        self.creators: dict[tuple[str, str, str], object] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self.creators.get((name, version, namespace))


_registry = PluginRegistry()


def get_plugin_registry() -> PluginRegistry:
    return _registry


def bindings_dir() -> str | None:
    """The installed tensorrt_bindings package folder (its __init__ is not run: it loads tensorrt.so)."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


def install() -> types.ModuleType:
    """sys.modules['tensorrt'] = this stand-in, whose submodule `plugin` is TensorRT's real library."""
    folder = bindings_dir()
    if folder is None:
        raise RuntimeError("tensorrt-cu12-bindings is not installed")
    module = types.ModuleType("tensorrt")
    module.__dict__.update({k: v for k, v in globals().items() if not k.startswith("_") and k not in
                            ("install", "bindings_dir", "annotations", "enum", "importlib", "sys", "types",
                             "metadata", "np", "BINDINGS_DIST")})
    module.float32, module.float16, module.bfloat16 = DataType.FLOAT, DataType.HALF, DataType.BF16
    module.int8, module.int32, module.int64, module.bool = DataType.INT8, DataType.INT32, DataType.INT64, DataType.BOOL
    module.__path__ = [folder]
    module.__version__ = metadata.version(BINDINGS_DIST)
    sys.modules["tensorrt"] = module
    return module
