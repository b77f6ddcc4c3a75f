"""Outputs are written all or nothing: a failure never leaves a partial file or folder behind.
Output folders carry a JSON manifest that says what wrote them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mla_fx.errors import LoadError, MLAFXError


def atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: Path, manifest_name: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` (only if `out` is missing, empty, or
    an earlier output of the same kind, recognised by its manifest)."""
    out = Path(out)
    if out.exists() and not (out / manifest_name).is_file() and any(out.iterdir()):
        raise MLAFXError(f"{out} exists and is not an {what}; choose another output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: Path, manifest_name: str, fmt: str, what: str, how_to_make: str) -> dict[str, Any]:
    path = Path(directory) / manifest_name
    if not Path(directory).is_dir() or not path.is_file():
        raise LoadError(f"{directory} is not an {what} (no {manifest_name}); make one with: {how_to_make}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise LoadError(f"{path}: format {found!r}, this mla-fx reads {fmt!r}")
    return manifest
