"""`mla-fx export CHECKPOINT --onnx` on a HF safetensors directory: the programs are built on meta weights and every
weight streams from the shards into weights.data, one tensor (one expert) at a time."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from _zoo import needs_hf

pytestmark = needs_hf("deepseek_v3")

from mla_fx.checkpoint import Checkpoint  # noqa: E402
from mla_fx.cli import main  # noqa: E402
from mla_fx.export.onnx import export_onnx  # noqa: E402
from mla_fx.inference import build_programs  # noqa: E402
from mla_fx.loading import load_model  # noqa: E402
from mla_fx.models import hf  # noqa: E402
from mla_fx.products import ONNX_MANIFEST  # noqa: E402


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A DeepseekV3 checkpoint with its MoE layer on, exported streamed (the CLI) and, for reference, from the
    model loaded whole (what the CLI did before)."""
    base = tmp_path_factory.mktemp("checkpoint-export")
    src = base / "deepseek_v3"
    hf.save_checkpoint("deepseek_v3", src, dtype=torch.float32)
    rc, printed = run_cli("export", str(src), "--onnx", "-o", str(base / "streamed"), "-q")
    assert rc == 0
    programs = build_programs(load_model(src).to(torch.float32))
    export_onnx(programs, base / "in_memory")
    return src, base / "streamed", base / "in_memory", printed


def feeds(session, manifest: dict, program: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    past = 4 if program == "step" else 0
    out = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            out[i.name] = rng.integers(0, manifest["vocab_size"], (2, 3))
        elif i.name == "position_ids":
            out[i.name] = np.tile(np.arange(past, past + 3), (2, 1))
        elif i.name == "attention_mask":
            out[i.name] = np.ones((2, past + 3), np.int64)
        else:
            out[i.name] = rng.standard_normal((2, past, i.shape[-1])).astype(np.float32)
    return out


def run_export(folder: Path, program: str) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / f"{program}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds(session, json.loads((folder / ONNX_MANIFEST).read_text()), program))


def ops(folder: Path, program: str) -> Counter:
    return Counter(n.op_type for n in onnx.load(folder / f"{program}.onnx", load_external_data=False).graph.node)


def test_streamed_export_is_the_in_memory_export(exports):
    """Same graph, same weights: ONNX Runtime gives bit-identical outputs; and the CLI's check against the original
    (loaded after the export, as it fits --check-memory) passed."""
    _, streamed, in_memory, printed = exports
    assert printed.count("PASSED |") == 4 and "FAILED" not in printed
    for program in ("step", "prefill"):
        assert ops(streamed, program) == ops(in_memory, program)
        assert ops(streamed, program)["LatentAttention" if program == "step" else "Attention"] == 2
        for a, b in zip(run_export(streamed, program), run_export(in_memory, program), strict=True):
            assert np.array_equal(a, b)
    weights = [json.loads((f / ONNX_MANIFEST).read_text())["weights"] for f in (streamed, in_memory)]
    assert weights[0] == weights[1] and weights[0]["shared"] > 0  # one copy of what both programs read


def test_weights_are_stored_as_the_graph_reads_them(exports):
    """A linear's weight is stored transposed (no Transpose of a weight is left in the graph), the fused experts
    are the checkpoint's experts stacked in order, and each initializer is named after its parameter."""
    src, streamed, _, _ = exports
    model = onnx.load(streamed / "step.onnx")
    initializers = {t.name: t for t in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    ckpt = Checkpoint(src)

    def stored(name: str) -> np.ndarray:
        return onnx.numpy_helper.to_array(initializers[name], base_dir=str(streamed))

    assert np.array_equal(stored("model.lm_head.weight"), ckpt.tensor("lm_head.weight").T.numpy())
    (layer,) = {k.split(".")[2] for k in ckpt.keys() if ".experts.0.down_proj" in k}
    down = stored(f"model.model.layers.{layer}.mlp.experts.down_proj")
    experts = sum(f".layers.{layer}.mlp.experts." in k and k.endswith("down_proj.weight") for k in ckpt.keys())
    assert down.shape[0] == experts
    for j in range(experts):
        want = ckpt.tensor(f"model.layers.{layer}.mlp.experts.{j}.down_proj.weight").numpy()
        assert np.array_equal(down[j], want) or np.array_equal(down[j], want.T)


def test_fp8_checkpoint_exports_dequantized(tmp_path):
    """DeepSeek-V3's FP8 format (blocks that do not divide every weight) streams into a float32 export that
    ONNX Runtime runs and the check passes."""
    src = tmp_path / "fp8"
    hf.save_checkpoint("deepseek_v3", src, dtype=torch.bfloat16, fp8_block=16)
    rc, printed = run_cli("export", str(src), "--onnx", "-o", str(tmp_path / "onnx"), "--decode-steps", "4", "-q")
    assert rc == 0 and printed.count("PASSED |") == 4
    assert json.loads((tmp_path / "onnx" / ONNX_MANIFEST).read_text())["dtype"] == "float32"


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    import onnxruntime, transformers
    from mla_fx.cli import main
    from mla_fx.export.onnx import export_onnx
    from mla_fx.inference import build_programs
    from mla_fx.loading import load_model
    if sys.argv[1] == "baseline":
        pass
    elif sys.argv[1] == "streamed":
        assert main(["export", sys.argv[2], "--onnx", "-o", sys.argv[3], "-q", "--check-memory", "0"]) == 0
    else:
        export_onnx(build_programs(load_model(sys.argv[2]).to(torch.float32)), sys.argv[3])
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def test_export_streams_in_less_memory_than_loading_the_model(tmp_path):
    """A 0.25 GB bf16 MoE checkpoint (4 layers, 16 experts) exported in float32 (0.5 GB of weights): the streamed
    export holds less than half of what the export of the model loaded whole holds beyond the imports."""
    from mla_fx.benchmarks.checkpoint_scale import V2_LITE, synthesize

    sizes = dict(V2_LITE, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048,
                 moe_intermediate_size=256, n_routed_experts=16, vocab_size=32000)
    src = tmp_path / "ckpt"
    synthesize(src, sizes, 4, False, shard_bytes=64 << 20)

    def child(*args):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]

    base = child("baseline")
    streamed = child("streamed", str(src), str(tmp_path / "streamed")) - base
    whole = child("whole", str(src), str(tmp_path / "whole")) - base
    assert streamed < 0.5 * whole, f"streamed {streamed / 1e6:.0f} MB, loaded whole {whole / 1e6:.0f} MB"
    # float32, twice the bf16 checkpoint (loaded whole, the synthetic all-ones norms share one copy by content)
    written = [(tmp_path / d / "weights.data").stat().st_size for d in ("streamed", "whole")]
    assert written[0] >= written[1] > 2 * Checkpoint(src).nbytes() * 0.95
