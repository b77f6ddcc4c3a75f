"""Safetensors shards written at disk speed: tensors kept as stored are copied by the kernel from their byte range
in the input shard (`os.copy_file_range`), never read into this process.

safetensors' writers (`save_file`) take tensors in memory: a kept tensor would be paged in through a memory map
and copied out again, about 3x slower than the disk here and holding up to a shard in memory. The format is a
little-endian u64 header size, a JSON header (dtype, shape, data_offsets per tensor, `__metadata__`) padded to 8
bytes, then the tensors' bytes back to back; the files written here are read back with safetensors in the tests.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mla_fx.errors import LoadError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 64 << 20


@dataclass(frozen=True)
class Stored:
    """A tensor's bytes as they lie in a shard."""

    path: Path
    offset: int  # from the start of the file
    nbytes: int
    dtype: str  # safetensors' name (BF16, F8_E4M3, ...)
    shape: tuple[int, ...]


def stored_tensors(path: Path) -> list[tuple[str, Stored]]:
    """(key, where its bytes are) for every tensor of a safetensors file, in file order."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from e
    start = 8 + size
    found = [(k, Stored(Path(path), start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0],
                        v["dtype"], tuple(v["shape"])))
             for k, v in header.items() if k != "__metadata__"]
    return sorted(found, key=lambda kv: kv[1].offset)


def _copy_range(src: int, dst: int, offset: int, nbytes: int) -> None:
    """`nbytes` of `src` from `offset` appended to `dst`: in the kernel where it can, else through a buffer."""
    while nbytes:
        try:
            done = os.copy_file_range(src, dst, min(nbytes, 1 << 30), offset)
        except (AttributeError, OSError) as e:  # not Linux, another filesystem, an old kernel
            if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            done = os.write(dst, os.pread(src, min(nbytes, _CHUNK), offset))
        if done == 0:
            raise OSError(errno.EIO, f"unexpected end of file copying {nbytes} more bytes")
        offset, nbytes = offset + done, nbytes - done


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def nbytes(value: Stored | torch.Tensor) -> int:
    return value.nbytes if isinstance(value, Stored) else value.numel() * value.element_size()


def write_shard(path: Path, entries: dict[str, Stored | torch.Tensor], metadata: dict[str, str],
                stop: threading.Event | None = None) -> None:
    """A safetensors file holding `entries` in order: stored ranges copied, tensors written from memory. Once
    `stop` is set it returns between two tensors, the file unfinished (for a folder about to be removed)."""
    header: dict[str, object] = {"__metadata__": metadata}
    end = 0
    for key, value in entries.items():
        if not isinstance(value, Stored) and value.dtype not in NAMES:
            raise ValueError(f"{key}: safetensors has no dtype {value.dtype}")
        dtype = value.dtype if isinstance(value, Stored) else NAMES[value.dtype]
        header[key] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [end, end + nbytes(value)]}
        end += nbytes(value)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    sources: dict[Path, int] = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, struct.pack("<Q", len(text)) + text)
        for value in entries.values():
            if stop is not None and stop.is_set():
                return
            if isinstance(value, Stored):
                if value.path not in sources:
                    sources[value.path] = os.open(value.path, os.O_RDONLY)
                _copy_range(sources[value.path], fd, value.offset, value.nbytes)
            else:
                data = _bytes(value)
                while data:
                    data = data[os.write(fd, data):]
    finally:
        os.close(fd)
        for src in sources.values():
            os.close(src)


class ShardWriter:
    """A sharded checkpoint: shards of at most `shard_bytes` (a larger tensor gets one to itself), then the index
    HF reads (`model.safetensors.index.json`)."""

    def __init__(self, folder: Path, index_name: str, metadata: dict[str, str], shard_bytes: int,
                 mode: int = 0o644, stop: threading.Event | None = None):
        self.folder, self.index_name, self.metadata, self.shard_bytes = folder, index_name, metadata, shard_bytes
        self.mode, self.stop = mode, stop
        self.pending: dict[str, Stored | torch.Tensor] = {}
        self.pending_bytes, self.total = 0, 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def add(self, key: str, value: Stored | torch.Tensor) -> None:
        size = nbytes(value)
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self.flush()
        self.pending[key] = value
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        write_shard(self.folder / name, self.pending, self.metadata, self.stop)
        os.chmod(self.folder / name, self.mode)
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Flush, name the shards `model-i-of-n`, write the index."""
        self.flush()
        renamed = {}
        for i, name in enumerate(self.files, 1):
            renamed[name] = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / name).rename(self.folder / renamed[name])
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())}}
        (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n")
