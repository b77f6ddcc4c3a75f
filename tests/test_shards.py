"""Shards written from byte ranges (mla_fx.shards) are safetensors files that safetensors itself reads back."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mla_fx.errors import LoadError
from mla_fx.shards import ShardWriter, stored_tensors, write_shard


@pytest.fixture
def source(tmp_path):
    tensors = {"a.weight": torch.randn(5, 3, dtype=torch.bfloat16),
               "b.weight": torch.randn(7, 9).to(torch.float8_e4m3fn),
               "b.weight_scale_inv": torch.rand(1, 1),
               "c.bias": torch.arange(11, dtype=torch.int64)}
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def same(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def test_ranges_and_tensors_make_a_file_safetensors_reads(source, tmp_path):
    path, tensors = source
    stored = dict(stored_tensors(path))
    assert set(stored) == set(tensors) and stored["b.weight"].dtype == "F8_E4M3"
    new = torch.randn(4, 4, dtype=torch.bfloat16)
    out = tmp_path / "out.safetensors"
    write_shard(out, {"b.weight": stored["b.weight"], "new": new, "c.bias": stored["c.bias"]}, {"format": "pt"})
    got, metadata = read(out)
    assert metadata == {"format": "pt"} and list(got) == ["b.weight", "c.bias", "new"]
    assert same(got["b.weight"], tensors["b.weight"]) and same(got["c.bias"], tensors["c.bias"])
    assert same(got["new"], new)


def test_writer_cuts_shards_and_indexes_them(source, tmp_path):
    path, tensors = source
    writer = ShardWriter(tmp_path, "index.json", {"format": "pt"}, shard_bytes=64)
    for key, stored in stored_tensors(path):
        writer.add(key, stored)
    writer.finish()
    index = json.loads((tmp_path / "index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for key, file in index["weight_map"].items():
        assert same(read(tmp_path / file)[0][key], tensors[key])


def test_a_set_stop_leaves_the_rest_unwritten(source, tmp_path):
    path, _ = source
    stop = threading.Event()
    stop.set()
    write_shard(tmp_path / "out.safetensors", dict(stored_tensors(path)), {}, stop)
    assert (tmp_path / "out.safetensors").stat().st_size < path.stat().st_size


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "x.safetensors").write_text("hello")
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        stored_tensors(tmp_path / "x.safetensors")
