"""Every MODEL form loads, and every bad one fails with a clear LoadError."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from mla_fx.errors import LoadError
from mla_fx.loading import load_model
from mla_fx.models import build_zoo
from mla_fx.models.reference import tiny_config

from _zoo import has_transformers


def _ids(n=7):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference():
    return build_zoo("reference")


def _config_file(tmp_path, reference):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(reference.config.to_dict()))
    return path


def test_exported_program(tmp_path, reference):
    ep = torch.export.export(reference, (_ids(),), strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.source == "exported" and loaded.vocab_size == 128 and loaded.module is None
    torch.testing.assert_close(loaded.reference()(_ids()), reference(_ids()))


def test_state_dict_and_safetensors_with_config(tmp_path, reference):
    config = _config_file(tmp_path, reference)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "w.safetensors")
    for weights in ("w.pt", "w.safetensors"):
        loaded = load_model(tmp_path / weights, config=config)
        torch.testing.assert_close(loaded.reference()(_ids()), reference(_ids()))
        with pytest.raises(LoadError, match="weights only; pass --config"):
            load_model(tmp_path / weights)


def test_weights_that_do_not_fit_the_config(tmp_path, reference):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(tiny_config(hidden_size=32).to_dict()))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(LoadError, match="do not fit the config"):
        load_model(tmp_path / "w.safetensors", config=other)


def test_pickled_module_needs_trust(tmp_path, reference):
    torch.save(reference, tmp_path / "model.pt")
    with pytest.raises(LoadError, match="pickled object; unpickling runs code.*--trust-pickle"):
        load_model(tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt", trust_pickle=True)
    torch.testing.assert_close(loaded.reference()(_ids()), reference(_ids()))


def test_reference_model_directory(tmp_path, reference):
    (tmp_path / "m").mkdir()
    _config_file(tmp_path / "m", reference)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "m" / "model.safetensors")
    loaded = load_model(tmp_path / "m")
    assert loaded.source == "reference"
    torch.testing.assert_close(loaded.reference()(_ids()), reference(_ids()))


@pytest.mark.skipif(not has_transformers(), reason="transformers not installed")
def test_hf_model_directory(tmp_path):
    model = build_zoo("deepseek_v3")
    model.model.save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.source == "hf" and loaded.hf_config["model_type"] == "deepseek_v3"
    torch.testing.assert_close(loaded.reference()(_ids()), model(_ids()))


@pytest.mark.skipif(not has_transformers(), reason="transformers not installed")
def test_hf_directory_with_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import load_file

    build_zoo("deepseek_v3").model.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(state, weights)
    with pytest.raises(LoadError, match=r"do not fit config.json: 1 missing \(e.g. model.layers.0.self_attn.kv_b_pr"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("content, match", [
    (b"hello, I am not a model\n", "is not a model"),
    (b"", "is not a model"),
    (bytes(range(256)) * 16, "is not a model"),  # random-looking bytes are not called a pickle
])
def test_files_that_are_not_models(tmp_path, content, match):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=match):
        load_model(path)


def test_trusted_pickle_that_is_not_a_model(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(LoadError, match="could not be unpickled|holds a dict"):
        load_model(path, trust_pickle=True)
    path.write_bytes(b"\x80\x04" + bytes(range(256)) * 4)
    with pytest.raises(LoadError, match="could not be unpickled"):
        load_model(path, trust_pickle=True)


def test_corrupt_export_archive(tmp_path):
    path = tmp_path / "broken.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("broken/models/model.json", "{not json")
    with pytest.raises(LoadError, match="not a loadable torch.export program"):
        load_model(path)


def test_export_archive_with_a_missing_weight_names_it(tmp_path, reference, capfd):
    good, bad = tmp_path / "good.pt2", tmp_path / "bad.pt2"
    torch.export.save(torch.export.export(reference, (_ids(),)), good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        names = [n for n in src.namelist() if "/data/weights/" in n]
        for n in src.namelist():
            if n != names[0]:
                dst.writestr(n, src.read(n))
    with pytest.raises(LoadError, match=r"not a loadable torch.export program \(.*file not found\)"):
        load_model(bad)
    assert "Traceback" not in capfd.readouterr().err  # torch's logged traceback is held back


def test_corrupt_safetensors(tmp_path, reference):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load_model(path, config=_config_file(tmp_path, reference))


def test_directories_and_names_that_are_not_models(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nothing")
    with pytest.raises(LoadError, match="without config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(LoadError, match="not a readable JSON config"):
        load_model(tmp_path)
    with pytest.raises(LoadError, match="unknown zoo model 'nope'"):
        load_model("zoo:nope")
