"""Real checkpoint sizes: `mla-fx absorb CHECKPOINT -o FOLDER` and `mla-fx export CHECKPOINT --onnx` on synthetic
checkpoints built as the real ones.

    python -m benchmarks.checkpoint_scale [--quick] [--out DIR] [--sizes v2lite:1,v2lite:4,...] [--keep]

A synthetic HF checkpoint (DeepseekV3 classes, hub key format: experts one by one) is written shard by shard,
never whole in memory, with random weights, at DeepSeek-V2-Lite sizes (hidden 2048, 16 heads, d_c 512,
d_r 64, no q_lora, 64 routed + 2 shared experts, 27 layers: 15.7B parameters) cut to N layers, in bf16
or in DeepSeek-V3's FP8 format (128x128 block scales), and at DeepSeek-V3 sizes (hidden 7168, 128 heads,
256 routed experts). Each absorb and export runs in its own process; its peak RSS (VmHWM) and wall time are read
next to the I/O floor measured in the same run: the time to read the checkpoint's bytes and write as many.
Aims (issue 11): V2-Lite at full size with peak RSS <= 6 GB, wall <= 3x the I/O floor, time linear in layers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import DEFAULT_OUT, Report

V2_LITE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
               num_experts_per_tok=6, first_k_dense_replace=1, vocab_size=102400, num_hidden_layers=27)
V3 = dict(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
          intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
          num_experts_per_tok=8, first_k_dense_replace=0, vocab_size=129280, num_hidden_layers=61)
V32 = dict(V3, index_n_heads=64, index_head_dim=128, index_topk=2048)  # DeepSeek-V3.2: V3 + the DSA indexer
FAMILIES = {"v2lite": V2_LITE, "v3": V3, "v32": V32}
SHARD_BYTES = 2 << 30
FP8_BLOCK = 128


def sizes(quick: bool) -> list[str]:
    if quick:
        return ["v2lite:1", "v2lite:2"]
    return ["v2lite:1", "v2lite:4", "v2lite:8", "v2lite:16", "v2lite:27", "v2lite-fp8:4", "v3-fp8:1", "v3-fp8:2"]


def parse_size(text: str) -> tuple[str, bool, int]:
    family, _, layers = text.partition(":")
    fp8 = family.endswith("-fp8")
    return family.removesuffix("-fp8"), fp8, int(layers)


def hub_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a DeepseekV3 checkpoint in the hub's key format (what save_pretrained writes)."""
    h, heads, d_c, d_r = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    d_qk, d_v, q_lora = cfg["qk_nope_head_dim"] + d_r, cfg["v_head_dim"], cfg["q_lora_rank"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        a = p + "self_attn."
        if q_lora:
            out += [(a + "q_a_proj.weight", (q_lora, h)), (a + "q_a_layernorm.weight", (q_lora,)),
                    (a + "q_b_proj.weight", (heads * d_qk, q_lora))]
        else:
            out += [(a + "q_proj.weight", (heads * d_qk, h))]
        out += [(a + "kv_a_proj_with_mqa.weight", (d_c + d_r, h)), (a + "kv_a_layernorm.weight", (d_c,)),
                (a + "kv_b_proj.weight", (heads * (cfg["qk_nope_head_dim"] + d_v), d_c)),
                (a + "o_proj.weight", (h, heads * d_v))]
        if "index_head_dim" in cfg:  # DSA's lightning indexer
            x, d_i, n_i = a + "indexer.", cfg["index_head_dim"], cfg["index_n_heads"]
            out += [(x + "wq_b.weight", (n_i * d_i, q_lora)), (x + "wk.weight", (d_i, h)),
                    (x + "k_norm.weight", (d_i,)), (x + "k_norm.bias", (d_i,)), (x + "weights_proj.weight", (n_i, h))]
        m = p + "mlp."
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            out += [(m + "gate_proj.weight", (inter, h)), (m + "up_proj.weight", (inter, h)),
                    (m + "down_proj.weight", (h, inter))]
            continue
        e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        out += [(m + "gate.weight", (e, h)), (m + "gate.e_score_correction_bias", (e,))]
        for j in range(e):
            x = f"{m}experts.{j}."
            out += [(x + "gate_proj.weight", (inter, h)), (x + "up_proj.weight", (inter, h)),
                    (x + "down_proj.weight", (h, inter))]
        shared = inter * cfg["n_shared_experts"]
        s = m + "shared_experts."
        out += [(s + "gate_proj.weight", (shared, h)), (s + "up_proj.weight", (shared, h)),
                (s + "down_proj.weight", (h, shared))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]


def synthesize(directory: Path, family: str | dict, layers: int, fp8: bool, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the checkpoint shard by shard (at most shard_bytes in memory); returns its config. `family`: a name in
    FAMILIES or a dict of sizes."""
    import torch
    from safetensors.torch import save_file

    from mla_fx.checkpoint import quantize_blocks
    from mla_fx.models.hf import FP8_SKIP

    cfg = dict(FAMILIES[family] if isinstance(family, str) else family, num_hidden_layers=layers)
    cls, model_type = ("DeepseekV32ForCausalLM", "deepseek_v32") if "index_head_dim" in cfg else \
        ("DeepseekV3ForCausalLM", "deepseek_v3")
    config = {"architectures": [cls], "model_type": model_type, "dtype": "bfloat16",
              "n_group": 1, "topk_group": 1, "rope_interleave": True, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "routed_scaling_factor": 2.5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **cfg}
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key, shape in hub_shapes(cfg):
        if len(shape) == 1:
            value = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else \
                torch.zeros(shape, dtype=torch.float32)
            tensors = {key: value}
        else:
            value = torch.empty(shape, dtype=torch.float32).normal_(0, shape[1] ** -0.5, generator=gen)
            if fp8 and not any(s in key for s in FP8_SKIP):
                q, scale = quantize_blocks(value, (FP8_BLOCK, FP8_BLOCK))
                tensors = {key: q, key + "_scale_inv": scale}
            else:
                tensors = {key: value.to(torch.bfloat16)}
        for k, v in tensors.items():
            if shard and size + v.numel() * v.element_size() > shard_bytes:
                flush()
            shard[k] = v
            size += v.numel() * v.element_size()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return config


def io_floor(directory: Path, scratch: Path) -> float:
    """Seconds to read every shard and write as many bytes (a plain copy, synced), measured now; each copy is
    removed before the next shard (disk space)."""
    import os

    seconds = 0.0
    for f in sorted(directory.glob("*.safetensors")):
        t0 = time.perf_counter()
        shutil.copyfile(f, scratch / f.name)
        os.sync()
        seconds += time.perf_counter() - t0
        (scratch / f.name).unlink()
    return seconds


EXPORT_DTYPE = "bfloat16"  # the checkpoint's: the ONNX of a 31 GB model stays 31 GB (float32 would not fit the disk)


def worker(command: str, model: str, out: str) -> dict:
    """In a child process: the CLI's absorb or export, then this process's peak RSS."""
    import os

    from mla_fx.cli import main

    from .common import peak_rss_bytes

    args = ["absorb", model, "-o", out, "-q"] if command == "absorb" else \
        ["export", model, "--onnx", "-o", out, "--dtype", EXPORT_DTYPE, "-q"]
    t0 = time.perf_counter()
    rc = main(args)
    os.sync()
    return {"rc": rc, "seconds": time.perf_counter() - t0, "peak_GB": peak_rss_bytes() / 1e9}


def _run_worker(command: str, src: Path, out: Path) -> tuple[dict | None, str]:
    proc = subprocess.run([sys.executable, "-m", f"{__package__}.checkpoint_scale", "--worker", command, str(src),
                           str(out)], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines or json.loads(lines[-1])["rc"] != 0:
        return None, "\n".join((proc.stdout + proc.stderr).splitlines()[-4:])
    return json.loads(lines[-1]), ""


def measure(size: str, scratch: Path) -> dict:
    family, fp8, layers = parse_size(size)
    src, out = scratch / f"{size.replace(':', '_')}", scratch / f"{size.replace(':', '_')}.absorbed"
    t0 = time.perf_counter()
    synthesize(src, family, layers, fp8)
    made_s = time.perf_counter() - t0
    from mla_fx.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    gb, params = ckpt.nbytes() / 1e9, ckpt.numel()
    floor = io_floor(src, scratch)
    row = {"checkpoint": size, "layers": layers, "dtype": "fp8 e4m3" if fp8 else "bf16", "params_B": params / 1e9,
           "checkpoint_GB": gb, "synthesize_s": made_s, "io_floor_s": floor}
    result, error = _run_worker("absorb", src, out)
    if result is None:
        row["error"] = f"absorb: {error}"
        print(f"[checkpoint] {size} absorb failed:\n{error}", flush=True)
    else:
        manifest = json.loads((out / "mla_fx.json").read_text())
        e2e = [c for c in manifest["checks"] if c.get("name") == "end to end"]
        row.update(absorb_s=result["seconds"], absorb_over_floor=result["seconds"] / floor,
                   absorb_s_per_layer=result["seconds"] / layers, peak_GB=result["peak_GB"],
                   layer_checks=sum(c.get("name", "").startswith("attention[") for c in manifest["checks"]),
                   end_to_end="skipped (memory)" if e2e else "passed",
                   output_GB=sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9)
        print(f"[checkpoint] {size}: {gb:.1f} GB, absorb {row['absorb_s']:.1f} s ({row['absorb_over_floor']:.2f}x "
              f"the {floor:.1f} s I/O floor), peak RSS {row['peak_GB']:.2f} GB", flush=True)
    shutil.rmtree(out, ignore_errors=True)  # disk: the export is written next
    result, error = _run_worker("export", src, out)
    if result is None:
        row["error"] = (row.get("error", "") + f" export: {error}").strip()
        print(f"[checkpoint] {size} export failed:\n{error}", flush=True)
    else:
        row.update(export_s=result["seconds"], export_over_floor=result["seconds"] / floor,
                   export_peak_GB=result["peak_GB"], onnx_GB=sum(f.stat().st_size for f in out.iterdir()) / 1e9)
        print(f"[checkpoint] {size}: export --onnx ({EXPORT_DTYPE}) {row['export_s']:.1f} s "
              f"({row['export_over_floor']:.2f}x the floor), {row['onnx_GB']:.1f} GB written, peak RSS "
              f"{row['export_peak_GB']:.2f} GB", flush=True)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def targets(rows: list[dict]) -> list[str]:
    """Issue 11's aims, checked against the measured rows."""
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"- absorb of {r['checkpoint']}: FAILED ({r['error'].splitlines()[-1]})")
    full = [r for r in rows if r["checkpoint"] == f"v2lite:{V2_LITE['num_hidden_layers']}" and "absorb_s" in r]
    if full:
        r = full[0]
        lines.append(f"- full-size V2-Lite absorbed with peak RSS <= 6 GB: {r['peak_GB']:.2f} GB "
                     f"({'met' if r['peak_GB'] <= 6 else 'NOT met'})")
        lines.append(f"- full-size V2-Lite absorb <= 3x the I/O floor: {r['absorb_over_floor']:.2f}x "
                     f"({'met' if r['absorb_over_floor'] <= 3 else 'NOT met'})")
        if "export_s" in r:
            lines.append(f"- full-size V2-Lite export --onnx with peak RSS <= 6 GB: {r['export_peak_GB']:.2f} GB "
                         f"({'met' if r['export_peak_GB'] <= 6 else 'NOT met'}); <= 3x the I/O floor: "
                         f"{r['export_over_floor']:.2f}x ({'met' if r['export_over_floor'] <= 3 else 'NOT met'})")
    else:
        lines.append("- full-size V2-Lite: not measured in this run")
    per_layer = [r["absorb_s_per_layer"] for r in rows if r.get("absorb_s") and r["checkpoint"].startswith("v2lite:")
                 and r["layers"] >= 4]
    if len(per_layer) >= 2:
        lines.append(f"- time linear in layers: V2-Lite seconds per layer {min(per_layer):.2f}..{max(per_layer):.2f} "
                     "from 4 layers up")
    return lines


def run(out: Path, quick: bool = False, only: list[str] | None = None, scratch: Path | None = None) -> Report:
    report = Report(out, "checkpoint_scale")
    base = Path(tempfile.mkdtemp(prefix="mla-fx-ckpt-", dir=scratch))
    try:
        rows = [measure(s, base) for s in (only or sizes(quick))]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    cols = ["checkpoint", "layers", "dtype", "params_B", "checkpoint_GB", "io_floor_s", "absorb_s",
            "absorb_over_floor", "absorb_s_per_layer", "peak_GB", "layer_checks", "end_to_end", "export_s",
            "export_over_floor", "export_peak_GB", "onnx_GB"]
    note = ("absorb = the whole `mla-fx absorb CKPT -o FOLDER` command in its own process: meta capture and passes, "
            "float64 check of every layer's attention, streamed shards, and the end-to-end check where the model "
            "fits in half the machine's memory. export = `mla-fx export CKPT --onnx -o DIR --dtype bfloat16` in its "
            "own process: meta capture, both programs lowered to ONNX, every weight read from the shards (FP8 "
            "dequantized, experts fused one at a time) into weights.data; ONNX Runtime has no bf16 CPU kernels, so "
            "no ONNX Runtime check runs at these sizes (a float32 export of a model that fits --check-memory is "
            "checked). I/O floor: copying the same shards in the same run.")
    report.add_table("absorb and ONNX export of real-size checkpoints (synthetic weights)", cols, rows, note)
    return report.finish(rows, lambda rows, path: None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--sizes", help="comma-separated FAMILY[-fp8]:LAYERS (families: v2lite, v3, v32)")
    p.add_argument("--scratch", type=Path, help="where the checkpoints are written (default: the system temp)")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)), flush=True)
        return 0
    run(a.out, a.quick, a.sizes.split(",") if a.sizes else None, a.scratch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
