"""Absorb a checkpoint of any size: passes on the structure, weights streamed shard by shard.

    plan_absorb:     capture with meta weights -> absorb pipeline (recording each new weight's recipe)
    write_absorbed:  input shards -> output shards, in a background thread while the rewritten program is
                     saved and every layer is checked: tensors the rewritten program still reads are copied as
                     stored by the kernel, byte for byte (FP8 stays FP8 with its scales; :mod:`mla_fx.shards`),
                     tensors it no longer reads are dropped, new weights are computed from their sources (FP8
                     sources dequantized) and written in the model's dtype.

The output folder is a checkpoint: config.json and the other small files of the input, safetensors shards
with an index, `program.pt2` (the rewritten program, its weights on meta) and `mla_fx.json` (what was
rewritten, each new weight's formula and sources, the dropped tensors, dtype changes, the checks).
:func:`mla_fx.load` turns it back into an ids -> logits module.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mla_fx.absorb import AbsorbConfig, AbsorbResult, absorb, to_program
from mla_fx.checkpoint import INDEX, Checkpoint
from mla_fx.errors import MLAFXError
from mla_fx.outputs import atomic_directory, permissions
from mla_fx.shards import ShardWriter, stored_tensors
from mla_fx.structure import Structure, capture_structure, run_on_cpu
from mla_fx.weight_recipes import Node, RecordTransforms, Source, describe, evaluate, recipe_of, sources

FORMAT = "mla-fx-absorbed-checkpoint/1"
MANIFEST = "mla_fx.json"
PROGRAM = "program.pt2"
SHARD_BYTES = 2 << 30  # output shards are cut at this size
SKIP_FILES = (".safetensors", ".bin", ".pt", ".pth", ".pt2")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class NewWeight:
    """A weight of the rewritten program that the checkpoint does not hold: computed from `sources`."""

    name: str  # parameter of the program
    key: str  # key in the output checkpoint
    recipe: Node
    sources: list[str]  # checkpoint keys it is computed from
    dtype: torch.dtype
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "formula": describe(self.recipe), "sources": self.sources,
                "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}


@dataclass
class AbsorbPlan:
    """What the rewrite of one checkpoint does to its tensors, decided before any weight is read."""

    checkpoint: Checkpoint
    structure: Structure
    result: AbsorbResult  # the rewritten graph, over meta weights
    graph_keys: dict[str, str]  # graph parameter -> checkpoint key, for the weights the recipes read
    new: list[NewWeight]
    dropped: list[str]  # checkpoint keys the rewritten program does not read (FP8 scales included)
    checks: list[dict] = field(default_factory=list)

    def fetch(self, dtype: torch.dtype | None = None) -> Callable[[str], torch.Tensor]:
        """Graph parameter name -> its value from the checkpoint (FP8 dequantized) in the model's dtype."""
        return lambda name: self.checkpoint.tensor(self.graph_keys[name], dtype or self.structure.dtype)

    def dtype_changes(self) -> list[dict[str, Any]]:
        """Sources stored in another dtype than the weights computed from them (FP8 kv_b_proj -> bf16)."""
        changes = []
        for w in self.new:
            stored = {k: _dtype_name(self.checkpoint.raw_dtype(k)) for k in w.sources}
            if any(d != _dtype_name(w.dtype) for d in stored.values()):
                changes.append({"key": w.key, "dtype": _dtype_name(w.dtype), "from": stored})
        return changes

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "source": str(self.checkpoint.directory), "program": PROGRAM,
            "mode": self.result.mode, "dtype": _dtype_name(self.structure.dtype),
            "vocab_size": self.structure.vocab_size, "max_seq": self.structure.max_seq,
            "layers": self.result.report()["layers"],
            "new_weights": {w.name: w.to_dict() for w in self.new},
            "dropped": self.dropped, "dtype_changes": self.dtype_changes(), "checks": self.checks,
        }


def _graph_params(gm) -> set[str]:
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def plan_absorb(checkpoint: Checkpoint, config: AbsorbConfig, dtype: torch.dtype | None = None) -> AbsorbPlan:
    structure = capture_structure(checkpoint, dtype)
    before = _graph_params(structure.graph)
    gm = structure.fresh_graph()
    with RecordTransforms():
        result = absorb(gm, config)
    after = dict(result.gm.named_parameters())
    graph_keys: dict[str, str] = {}
    new = []
    for name, param in after.items():
        recipe = recipe_of(param)
        if isinstance(recipe, Source) and recipe.name == name:
            continue  # an original weight, untouched
        if recipe is None:
            raise MLAFXError(f"the rewrite made a weight {name!r} whose computation was not recorded")
        keys = []
        for src in sources(recipe):
            graph_keys[src] = structure.checkpoint_key(src, checkpoint)
            keys.append(graph_keys[src])
        prefix = keys[0].rsplit(".", 2)[0]  # the attention module of the first source
        new.append(NewWeight(name, f"{prefix}.mla_fx.{name}", recipe, keys, param.dtype, tuple(param.shape)))
    dropped = []
    for name in sorted(before - _graph_params(result.gm)):
        if name in structure.buffers:
            continue
        key = structure.checkpoint_key(name, checkpoint)
        dropped += [key] + ([checkpoint.scale_key(key)] if checkpoint.scale_key(key) else [])
    return AbsorbPlan(checkpoint, structure, result, graph_keys, new, dropped)


def _save_program(plan: AbsorbPlan, path: Path) -> None:
    """The rewritten program with its weights on meta; the buffers no checkpoint holds keep their values."""
    program = to_program(plan.result.gm, plan.structure.example(), max_seq=plan.structure.max_seq)
    for name, value in plan.structure.buffers.items():
        for table in (program.constants, program.state_dict):
            if name in table:
                table[name] = value
    run_on_cpu(program.graph)
    program.graph_module.recompile()
    torch.export.save(program, path)


def _stream_shards(plan: AbsorbPlan, writer: ShardWriter, bar, stop: threading.Event) -> None:
    """Every input shard, one tensor at a time, into `writer`: kept tensors as stored, dropped ones skipped, new
    weights computed when the shard holding their first source has passed. Returns early once `stop` is set."""
    ckpt, dropped = plan.checkpoint, set(plan.dropped)
    new_by_shard: dict[str, list[NewWeight]] = {}
    for w in plan.new:
        new_by_shard.setdefault(ckpt.shard_of[w.sources[0]], []).append(w)
    fetch = plan.fetch()
    for shard in ckpt.shards:
        for key, stored in stored_tensors(ckpt.directory / shard):
            if stop.is_set():
                return
            if key not in dropped:
                writer.add(key, stored)  # copied as stored, byte for byte
        for w in new_by_shard.get(shard, []):
            writer.add(w.key, evaluate(w.recipe, fetch))
        bar.update((ckpt.directory / shard).stat().st_size)
    writer.flush()


def write_absorbed(plan: AbsorbPlan, out: Path, progress: Callable[[str], None], quiet: bool = False,
                   alongside: Callable[[], None] | None = None,
                   before_commit: Callable[[Path], None] | None = None, shard_bytes: int = SHARD_BYTES) -> None:
    """Stream the checkpoint into `out` (all or nothing). The shards stream in a background thread (their reads
    and writes release the GIL) while this thread writes the rewritten program and runs `alongside()` (the
    per-layer checks): an exception from either side stops both and nothing is written. `before_commit(folder)`
    checks the finished folder."""
    from tqdm import tqdm

    ckpt = plan.checkpoint
    with atomic_directory(out, MANIFEST, "absorbed checkpoint") as tmp:
        for f in sorted(ckpt.directory.iterdir()):
            if f.is_file() and not f.name.endswith(SKIP_FILES) and f.name not in (INDEX, MANIFEST):
                shutil.copy2(f, tmp / f.name)
        stop = threading.Event()
        writer = ShardWriter(tmp, INDEX, {"format": "pt", "written_by": "mla-fx"}, shard_bytes,
                             permissions(directory=False), stop)
        with tqdm(total=ckpt.nbytes(), unit="B", unit_scale=True, desc="absorb: shards", disable=quiet) as bar, \
                ThreadPoolExecutor(1, thread_name_prefix="mla-fx-shards") as pool:
            streaming = pool.submit(_stream_shards, plan, writer, bar, stop)
            try:
                progress(f"writing the rewritten program ({PROGRAM}) while the shards stream")
                _save_program(plan, tmp / PROGRAM)
                if alongside is not None:
                    alongside()
                streaming.result()
            except BaseException:
                stop.set()  # the pool's exit waits for the thread, which stops at its next tensor
                raise
        writer.finish()
        (tmp / MANIFEST).write_text(json.dumps(plan.manifest(), indent=2) + "\n")
        if before_commit is not None:
            before_commit(tmp)
            (tmp / MANIFEST).write_text(json.dumps(plan.manifest(), indent=2) + "\n")  # with the checks
