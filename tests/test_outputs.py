"""All-or-nothing outputs: a failed write leaves nothing, not even the folders made for it."""

import os

import pytest

from mla_fx.errors import MLAFXError
from mla_fx.outputs import atomic_directory, atomic_file, check_writable


def test_a_failed_file_write_leaves_nothing(tmp_path):
    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("simulated")

    with pytest.raises(RuntimeError, match="simulated"):
        atomic_file(tmp_path / "a" / "b" / "x.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_written_file_replaces_the_old_one_with_umask_permissions(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    atomic_file(path, lambda tmp: tmp.write_text("new"))
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failed_directory_keeps_the_earlier_one(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, "m.json", "output") as tmp:
        (tmp / "m.json").write_text("{}")
        (tmp / "data").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(out, "m.json", "output") as tmp:
        (tmp / "m.json").write_text("{}")
        raise RuntimeError("simulated")
    assert (out / "data").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_check_writable_names_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MLAFXError, match="it exists and is a file"):
        check_writable(tmp_path / "file", directory=True, what="the export")
    with pytest.raises(MLAFXError, match="is not a writable folder"):
        check_writable(tmp_path / "file" / "x.pt2", directory=False, what="the program")
    check_writable(tmp_path / "new" / "deeper" / "x.pt2", directory=False, what="the program")
    assert not (tmp_path / "new").exists()  # checking creates nothing
