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


def permissions(directory: bool) -> int:
    """What a plain open()/mkdir() would give under the current umask (mkstemp/mkdtemp make 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_writable(path: Path, *, directory: bool, what: str) -> None:
    """Fail before any work when `path` cannot be written: an existing entry of the other kind, or a
    nearest existing parent that is not a writable folder."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() != directory:
        raise MLAFXError(f"cannot write {what} {path}: it exists and is {'a file' if directory else 'a directory'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MLAFXError(f"cannot write {what} {path}: {parent} is not a writable folder")


def _make_parents(path: Path) -> Path | None:
    """Create the missing folders above `path`; the topmost one created (to remove on failure), or None."""
    missing = [p for p in path.absolute().parents if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    try:
        created = _make_parents(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp", suffix=path.suffix)
        os.close(fd)
    except OSError as e:
        raise MLAFXError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        write(Path(tmp))
        os.chmod(tmp, permissions(directory=False))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(e, OSError):
            raise MLAFXError(f"cannot write {path}: {e.strerror or e}") from e
        raise


@contextlib.contextmanager
def atomic_directory(out: Path, manifest_name: str, what: str) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` (only if `out` is missing, empty, or
    an earlier output of the same kind, recognised by its manifest). Whatever fails, the earlier `out` stays."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MLAFXError(f"{out} exists and is a file; choose an output directory")
    if out.exists() and not (out / manifest_name).is_file() and any(out.iterdir()):
        raise MLAFXError(f"{out} exists and is not an {what}; choose another output directory")
    try:
        created = _make_parents(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    except OSError as e:
        raise MLAFXError(f"cannot write {out}: {e.strerror or e}") from e
    try:
        yield tmp
        os.chmod(tmp, permissions(directory=True))
        _replace_directory(tmp, out)
    except BaseException as e:
        shutil.rmtree(created or tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise MLAFXError(f"cannot write {out}: {e.strerror or e}") from e
        raise


def _replace_directory(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is moved aside first and put back if the move fails."""
    if not out.exists():
        new.rename(out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old")) / out.name
    out.rename(aside)
    try:
        new.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)


def read_manifest(directory: Path, manifest_name: str, fmt: str, what: str, how_to_make: str) -> dict[str, Any]:
    path = Path(directory) / manifest_name
    if not Path(directory).exists():
        raise LoadError(f"{directory} does not exist; make an {what} with: {how_to_make}")
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
