"""`mla-fx absorb CHECKPOINT -o FOLDER`: the streamed rewrite of HF checkpoints (MoE on, bf16/FP8), its checks,
and `mla_fx.load` on every output kind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import mla_fx  # noqa: E402
from mla_fx.absorb import AbsorbConfig  # noqa: E402
from mla_fx.absorbed_checkpoint import MANIFEST, PROGRAM, plan_absorb  # noqa: E402
from mla_fx.check import compare_to_float64  # noqa: E402
from mla_fx.checkpoint import Checkpoint  # noqa: E402
from mla_fx.checkpoint_checks import layer_checks  # noqa: E402
from mla_fx.cli import main  # noqa: E402
from mla_fx.models import hf  # noqa: E402
from mla_fx.weight_recipes import Recipe  # noqa: E402

LATENT = torch.ops.mla_fx.latent_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Zoo checkpoints (MoE layer on) and what absorb wrote for them: name -> (source, output)."""
    base = tmp_path_factory.mktemp("ckpt")
    cases = {"deepseek_v3": ("deepseek_v3", torch.float32, None, "auto"),
             "deepseek_v3_fold": ("deepseek_v3", torch.float32, None, "fold"),
             "glm4_moe_lite": ("glm4_moe_lite", torch.float32, None, "auto"),
             # 16-row blocks do not divide kv_a_proj_with_mqa's 40 rows, as 128 does not divide DeepSeek-V3's 576
             "deepseek_v3_fp8": ("deepseek_v3", torch.bfloat16, 16, "auto")}
    made = {}
    for case, (name, dtype, block, mode) in cases.items():
        src, out = base / case, base / f"{case}.absorbed"
        hf.save_checkpoint(name, src, dtype=dtype, fp8_block=block)
        assert main(["absorb", str(src), "-o", str(out), "--mode", mode, "-q"]) == 0
        made[case] = (src, out)
    return made


def ids(seq: int = 11) -> torch.Tensor:
    return torch.randint(0, hf.VOCAB, (2, seq), generator=torch.Generator().manual_seed(3))


def program_ops(out: Path) -> tuple[int, int]:
    graph = torch.export.load(out / PROGRAM).graph
    return sum(n.target is LATENT for n in graph.nodes), sum(n.target is SDPA for n in graph.nodes)


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v3_fold", "glm4_moe_lite"])
def test_absorbed_checkpoint_matches_the_original(folders, case):
    src, out = folders[case]
    assert program_ops(out) == (hf.LAYERS, 0)  # every attention is latent attention over the cache, none is left
    manifest = json.loads((out / MANIFEST).read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    source = Checkpoint(src)
    assert not set(manifest["dropped"]) & set(index)  # what the program no longer reads is not written
    assert {w["key"] for w in manifest["new_weights"].values()} <= set(index)
    assert set(index) == (set(source.keys()) - set(manifest["dropped"])) | {w["key"] for w in
                                                                           manifest["new_weights"].values()}
    dropped = {k.rsplit(".", 2)[-2] for k in manifest["dropped"]}
    assert dropped == ({"kv_b_proj", "q_b_proj", "o_proj"} if case.endswith("fold") else {"kv_b_proj"})
    assert all(c["passed"] for c in manifest["checks"])
    assert sum(c["name"].startswith("attention[") for c in manifest["checks"]) == hf.LAYERS
    assert sum(c["name"].startswith("logits[") for c in manifest["checks"]) == 2  # end to end ran (tiny model)

    model = mla_fx.load(out)
    original = hf.build(case.removesuffix("_fold"))
    with torch.no_grad():
        ref, got = original(ids()), model(ids())
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_fp8_checkpoint_keeps_fp8_and_dequantizes_kv_b(folders):
    src, out = folders["deepseek_v3_fp8"]
    absorbed, source = Checkpoint(out), Checkpoint(src)
    manifest = json.loads((out / MANIFEST).read_text())
    assert source.raw_dtype("model.layers.0.self_attn.kv_b_proj.weight") == torch.float8_e4m3fn
    for key in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.0.up_proj.weight"):
        assert absorbed.raw_dtype(key) == torch.float8_e4m3fn and absorbed.has(key + "_scale_inv")
        assert torch.equal(absorbed.raw(key).view(torch.uint8), source.raw(key).view(torch.uint8))  # as stored
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in manifest["dropped"]
    new = manifest["new_weights"].values()
    assert {w["dtype"] for w in new} == {"bfloat16"}
    changes = manifest["dtype_changes"]
    assert len(changes) == len(new) and all(set(c["from"].values()) == {"float8_e4m3fn"} for c in changes)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    # W_UK is kv_b_proj dequantized with its block scales, rows gathered per head: exact in bf16
    uk = next(w for w in new if w["key"].endswith("w_uk") and ".layers.0." in w["key"])
    kv_b = source.tensor("model.layers.0.self_attn.kv_b_proj.weight", torch.bfloat16)
    w_uk = absorbed.tensor(uk["key"])
    d_nope = hf.QK_NOPE
    per_head = kv_b.reshape(hf.HEADS, d_nope + hf.V_HEAD, hf.KV_LORA)[:, :d_nope]
    assert torch.equal(w_uk, per_head)

    from mla_fx import transformers_loading
    from mla_fx.models.wrappers import CausalLMLogits

    with transformers_loading.quiet_loading():
        exact = CausalLMLogits(transformers_loading.from_pretrained(src, dtype=torch.float64)[0])
        original = CausalLMLogits(transformers_loading.from_pretrained(src, dtype=torch.bfloat16)[0])
    with torch.no_grad():
        cmp = compare_to_float64("fp8", exact(ids()), original(ids()), mla_fx.load(out)(ids()))
    assert cmp.passed, cmp.line()


def test_layer_check_catches_a_wrong_weight(folders):
    src, _ = folders["deepseek_v3"]
    plan = plan_absorb(Checkpoint(src), AbsorbConfig("reassociate"))
    assert all(c.passed for c in layer_checks(plan, quiet=True))
    wrong = next(w for w in plan.new if w.name.endswith("_1_w_uk"))  # layer 1's W_UK, 1% off
    wrong.recipe = Recipe(torch.mul, (wrong.recipe, 1.01), {})
    first, second = layer_checks(plan, quiet=True)
    assert first.passed and not second.passed and second.rel_l2 > 1e-4


def test_layer_blocks_compute_in_float64_throughout(tmp_path):
    """A bf16 checkpoint's structure carries its casts (RMSNorm to float32 and back to bf16, rotary cos/sin in
    bf16); the per-layer check must not round there: layer 0's original block, on HF's own input to the attention,
    equals HF's attention computed in float64, to float64 rounding."""
    from mla_fx import transformers_loading
    from mla_fx.layer_check import layer_blocks
    from mla_fx.models.wrappers import CausalLMLogits
    from mla_fx.precision import true_float64

    src = tmp_path / "bf16"
    hf.save_checkpoint("deepseek_v3", src, dtype=torch.bfloat16)
    plan = plan_absorb(Checkpoint(src), AbsorbConfig("reassociate"))
    assert plan.structure.dtype == torch.bfloat16
    with transformers_loading.quiet_loading():
        model = transformers_loading.from_pretrained(src, dtype=torch.float64)[0].eval()
    seen = {}
    attention = model.model.layers[0].self_attn
    attention.register_forward_hook(lambda m, args, kwargs, out: seen.update(h=kwargs["hidden_states"], out=out[0]),
                                    with_kwargs=True)
    x = ids(17)
    with torch.no_grad(), true_float64(torch.float64):
        CausalLMLogits(model)(x)
    ckpt = plan.checkpoint

    def fetch64(name):
        if name in plan.structure.buffers:
            return plan.structure.buffers[name].double()
        return ckpt.tensor(plan.structure.checkpoint_key(name, ckpt), torch.float64)

    original, _ = layer_blocks(plan.structure.graph, plan.result.gm, plan.result.sites[0], fetch64,
                               {w.name: w.recipe for w in plan.new})
    with torch.no_grad():
        got = original(seen["h"], *[x] * (len(original.graph.find_nodes(op="placeholder")) - 1))
    assert got.dtype == torch.float64
    assert ((got - seen["out"]).norm() / seen["out"].norm()).item() < 1e-12


def test_absorb_to_a_folder_refuses_what_it_cannot_stream(tmp_path, capsys):
    assert main(["absorb", "zoo:deepseek_v3", "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "needs MODEL to be a HF safetensors directory" in capsys.readouterr().err
    assert main(["absorb", str(tmp_path), "-o", str(tmp_path / "o2"), "-q"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def test_load_pt2_output(tmp_path):
    out = tmp_path / "a.pt2"
    assert main(["absorb", "zoo:deepseek_v3", "-o", str(out), "--dtypes", "float32", "--generate", "0", "-q"]) == 0
    original = hf.build("deepseek_v3")
    with torch.no_grad():
        ref, got = original(ids()), mla_fx.load(out)(ids())
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    from mla_fx.cli import main
    if sys.argv[1] == "baseline":
        import transformers, mla_fx.absorbed_checkpoint  # what absorb imports, nothing loaded
        rc = 0
    else:
        rc = main(["absorb", sys.argv[1], "-o", sys.argv[2], "-q", "--check-memory", "0", "--max-shard-size", "0.05"])
    print(json.dumps({"rc": rc, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")


def test_streams_a_checkpoint_in_less_memory_than_its_weights(tmp_path):
    """A 0.26 GB bf16 MoE checkpoint (4 layers, 16 experts) is absorbed (checks included) holding less than 0.6 of
    its size beyond what the imports take; loading it whole, as the .pt2 path does, takes twice its size in
    float32 alone."""
    from mla_fx.benchmarks.checkpoint_scale import V2_LITE, synthesize

    sizes = dict(V2_LITE, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, intermediate_size=2048,
                 moe_intermediate_size=256, n_routed_experts=16, vocab_size=32000)
    src = tmp_path / "ckpt"
    synthesize(src, sizes, 4, False, shard_bytes=64 << 20)
    size = Checkpoint(src).nbytes()
    assert size > 250e6

    def child(*args):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    base, run = child("baseline"), child(str(src), str(tmp_path / "out"))
    assert run["rc"] == 0
    extra = run["peak"] - base["peak"]
    assert extra < 0.6 * size, f"absorb held {extra / 1e6:.0f} MB over the imports for a {size / 1e6:.0f} MB checkpoint"
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert sum(c.get("passed", False) for c in manifest["checks"]) == 4  # every layer checked in float64
    assert any("skipped" in c for c in manifest["checks"])  # end to end: over the 0 GiB budget given
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 4  # 50 MB output shards


def test_interrupted_absorb_leaves_nothing(folders, tmp_path):
    """SIGTERM in the middle of the write: one line, exit 130, no folder and no hidden temporary left."""
    src, _ = folders["deepseek_v3"]
    script = textwrap.dedent(f"""
        import os, signal, sys
        import mla_fx.absorbed_checkpoint as ac
        from mla_fx.cli import main
        save = ac._save_program
        def save_then_stop(plan, path):
            save(plan, path)
            os.kill(os.getpid(), signal.SIGTERM)
        ac._save_program = save_then_stop
        sys.exit(main(["absorb", {str(src)!r}, "-o", {str(tmp_path / 'out')!r}, "-q"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 130
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_fp8_dequantization_matches_transformers_and_takes_ragged_blocks():
    """Bit-equal to transformers' own FP8 dequantization where it works (rows a multiple of the block); rows that
    are not (DeepSeek-V3's 576-row kv_a_proj_with_mqa) dequantize block by block all the same."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from mla_fx.checkpoint import dequantize_blocks, quantize_blocks

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 384, generator=gen)
    q, scale = quantize_blocks(weight, (128, 128))
    theirs = Fp8Dequantize.__new__(Fp8Dequantize)._dequantize_one(q, scale, torch.bfloat16)
    assert torch.equal(dequantize_blocks(q, scale, (128, 128), torch.bfloat16), theirs)
    ragged = torch.randn(576, 300, generator=gen)
    q, scale = quantize_blocks(ragged, (128, 128))
    assert scale.shape == (5, 3)
    got = dequantize_blocks(q, scale, (128, 128), torch.float32)
    assert ((got - ragged).norm() / ragged.norm()).item() < 0.05  # e4m3 keeps 3 mantissa bits
    assert torch.equal(got[512:, 256:], q[512:, 256:].float() * scale[4, 2])  # the partial corner block
