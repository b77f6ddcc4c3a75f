"""Loading MODEL: a torch.export program, a HF model directory, a reference-model directory, a
state dict or safetensors file with a config, a pickled nn.Module (only when trusted), or a
built-in name (`example`, `zoo:NAME`)."""

from __future__ import annotations

import copy
import json
import logging
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from mla_fx import transformers_loading
from mla_fx.errors import LoadError, require
from mla_fx.models.reference import MODEL_TYPE, MLAConfig, MLAForCausalLM
from mla_fx.models.wrappers import CausalLMLogits
from mla_fx.passes.capture import capture, graph_module

EXAMPLE = "example"
DEFAULT_MAX_SEQ = 4096


@dataclass
class LoadedModel:
    """What the pipeline needs from a model: something to capture and something to compare against."""

    name: str
    source: str  # builtin | zoo | exported | reference | hf | state_dict | pickle
    module: nn.Module | None  # eager model, input_ids -> logits; None for an exported program
    program: torch.export.ExportedProgram | None
    vocab_size: int
    max_seq: int = DEFAULT_MAX_SEQ
    hf_config: dict[str, Any] | None = None
    note: str | None = None  # what was loaded, where it is not the whole model (a multimodal text decoder)

    @property
    def dtype(self) -> torch.dtype:
        params = self.module.parameters() if self.module is not None else self.program.state_dict.values()
        return next(p.dtype for p in params if p.is_floating_point())

    def reference(self):
        """The original model as an ids -> logits callable."""
        return self.module if self.module is not None else self.program.module()

    def example(self, batch: int = 2, seq: int = 9) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(1234)
        return (torch.randint(0, self.vocab_size, (batch, min(seq, self.max_seq)), generator=g),)

    def capture(self) -> fx.GraphModule:
        if self.program is not None:
            return graph_module(self.program)
        return capture(self.module, self.example(), max_seq=self.max_seq)

    def to(self, dtype: torch.dtype) -> LoadedModel:
        """A copy in another dtype (eager models only: an exported graph has its dtypes baked in)."""
        if dtype == self.dtype:
            return self
        if self.module is None:
            raise LoadError(f"{self.name} is an exported program in {self.dtype}; it cannot be cast to {dtype}")
        return replace(self, module=copy.deepcopy(self.module).to(dtype))


def _vocab_of_program(program: torch.export.ExportedProgram) -> int:
    out = next(n for n in program.graph.nodes if n.op == "output").args[0]
    val = out[0].meta.get("val") if isinstance(out, (tuple, list)) else None
    if val is None or val.dim() != 3:
        raise LoadError("the exported program does not return logits [batch, seq, vocab]")
    return int(val.shape[-1])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(data, dict):
        raise LoadError(f"{path}: a config must be a JSON object")
    return data


def _from_config(config: dict[str, Any], name: str) -> LoadedModel:
    """An eager model with random weights built from a config dict (reference or HF)."""
    if config.get("model_type") == MODEL_TYPE:
        try:
            cfg = MLAConfig.from_dict(config)
        except ValueError as e:
            raise LoadError(f"{name}: {e}") from e
        return LoadedModel(name, "reference", MLAForCausalLM(cfg).eval(), None, cfg.vocab_size,
                           cfg.max_position_embeddings)
    tf = require("transformers", "hf", "Loading a HF transformers model")
    try:
        model, choice = transformers_loading.from_config(tf.AutoConfig.for_model(**config))
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{name}: cannot build a causal LM from config "
                        f"(model_type={config.get('model_type')!r}): {e}") from e
    return _hf_model(name, model, choice)


def _hf_model(name: str, model: nn.Module, choice: transformers_loading.ModelChoice) -> LoadedModel:
    cfg = model.config.get_text_config(decoder=True) if choice.text_only else model.config
    return LoadedModel(name, "hf", CausalLMLogits(model).eval(), None, cfg.vocab_size,
                       getattr(cfg, "max_position_embeddings", DEFAULT_MAX_SEQ), cfg.to_dict(),
                       transformers_loading.text_decoder_note(choice))


def _load_state(model: LoadedModel, state: dict[str, torch.Tensor], origin: str) -> LoadedModel:
    target = model.module.model if isinstance(model.module, CausalLMLogits) else model.module
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LoadError(f"{origin}: weights do not fit the config: {str(e).splitlines()[0]} ...") from e
    return model


def _load_directory(path: Path) -> LoadedModel:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LoadError(f"{path} is a directory without config.json: not a HF or mla-fx model directory")
    config = _read_json(cfg_file)
    if config.get("model_type") == MODEL_TYPE:
        from mla_fx.models.trained import load_reference_dir

        module = load_reference_dir(path)
        return LoadedModel(str(path), "reference", module, None, module.config.vocab_size,
                           module.config.max_position_embeddings)
    require("transformers", "hf", "Loading a HF transformers model directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise LoadError(f"{path} has a config.json but no weights (*.safetensors)")
    try:
        model, choice, info = transformers_loading.from_pretrained(path)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{path}: transformers cannot load this directory: {e}") from e
    problems = {what: sorted(info.get(key) or []) for what, key in
                (("missing", "missing_keys"), ("of the wrong shape", "mismatched_keys"))}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{len(k)} {what} (e.g. {', '.join(map(str, k[:3]))})" for what, k in problems.items())
        raise LoadError(f"{path}: the weights do not fit config.json: {listed}")
    return _hf_model(str(path), model, choice)


def _load_file(path: Path, config: Path | None, trust_pickle: bool) -> LoadedModel:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise LoadError(f"{path}: not a readable safetensors file ({e})") from e
        return _with_config(state, path, config)
    if zipfile.is_zipfile(path) and _is_export_archive(path):
        logged: list[str] = []

        def hold(record: logging.LogRecord) -> bool:  # torch logs the reading error as a traceback; keep its gist
            if record.exc_info and record.exc_info[1] is not None:
                logged.append(str(record.exc_info[1]).split(". ")[0])
            return False

        export_logger = logging.getLogger("torch.export")
        export_logger.addFilter(hold)
        try:
            program = torch.export.load(path)
        except Exception as e:
            reason = logged[-1] if logged else str(e)
            raise LoadError(f"{path}: not a loadable torch.export program ({reason.strip()[:300]})") from e
        finally:
            export_logger.removeFilter(hold)
        return LoadedModel(str(path), "exported", None, program, _vocab_of_program(program))
    not_a_model = (f"{path} is not a model: neither a torch.export program (.pt2), a state dict, a pickled "
                   "module, nor a safetensors file")
    if not _looks_like_torch_save(path):
        raise LoadError(not_a_model)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" not in str(e) and "Unpickl" not in type(e).__name__ + str(e):
            raise LoadError(f"{not_a_model} ({type(e).__name__})") from e
        if not trust_pickle:
            raise LoadError(f"{path} is a pickled object; unpickling runs code from the file. "
                            "Pass --trust-pickle only if you trust its author") from e
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise LoadError(f"{path} could not be unpickled ({type(e2).__name__}: {str(e2)[:200]})") from e2
    if isinstance(obj, nn.Module):
        module = CausalLMLogits(obj) if hasattr(obj, "config") and hasattr(obj, "generation_config") else obj
        vocab = getattr(getattr(obj, "config", None), "vocab_size", None)
        if vocab is None:
            raise LoadError(f"{path}: a pickled module needs a .config with vocab_size")
        return LoadedModel(str(path), "pickle", module.eval(), None, int(vocab))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _with_config(obj, path, config)
    raise LoadError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive (or, in its legacy format, a pickle: protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def _is_export_archive(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in z.namelist())


def _with_config(state: dict[str, torch.Tensor], path: Path, config: Path | None) -> LoadedModel:
    if config is None:
        raise LoadError(f"{path} holds weights only; pass --config CONFIG.json (a HF or mla-fx config)")
    return _load_state(_from_config(_read_json(Path(config)), str(path)), state, str(path))


def load_model(model: str | Path, *, config: str | Path | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL as the CLI's argument describes it; every failure is a LoadError with the reason."""
    spec = str(model)
    if config is not None and (spec == EXAMPLE or spec.startswith("zoo:") or Path(spec).is_dir()):
        raise LoadError(f"--config is for a bare state dict or safetensors file; {spec} brings its own config")
    if spec == EXAMPLE:
        from mla_fx.models.trained import load_tiny_mla

        module = load_tiny_mla()
        return LoadedModel("example (shipped tiny-mla)", "builtin", module, None, module.config.vocab_size,
                           module.config.max_position_embeddings)
    if spec.startswith("zoo:"):
        from mla_fx.models import build_zoo, zoo_names

        name = spec.removeprefix("zoo:")
        try:
            module = build_zoo(name)
        except KeyError:
            raise LoadError(f"unknown zoo model {name!r}; known: {', '.join(zoo_names())}") from None
        cfg = module.config
        vocab = cfg.vocab_size
        max_seq = cfg.max_position_embeddings
        hf_cfg = cfg.to_dict() if hasattr(cfg, "to_json_string") else None
        return LoadedModel(spec, "zoo", module, None, vocab, max_seq, hf_cfg)
    path = Path(spec)
    if not path.exists():
        raise LoadError(f"MODEL {spec!r} does not exist (expected a .pt2, a model directory, a weights file, "
                        f"'{EXAMPLE}' or 'zoo:NAME')")
    return _load_directory(path) if path.is_dir() else _load_file(path, Path(config) if config else None,
                                                                   trust_pickle)
