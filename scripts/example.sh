#!/usr/bin/env bash
# The main job on the built-in example (the shipped trained MLA model):
#  1. absorb: rewrite it into absorbed MQA over the latent cache, check it, write a .pt2 and a report;
#  2. export: step + prefill programs over the latent cache to ONNX, checked in ONNX Runtime;
#  3. generate text with the ONNX export, and with the rewritten .pt2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/mla-fx absorb example -o out/tiny-mla.absorbed.pt2 --report out/tiny-mla.report.json
.venv/bin/mla-fx export example --onnx -o out/tiny-mla-onnx
echo "ONNX Runtime generates:"
.venv/bin/mla-fx generate out/tiny-mla-onnx --prompt "The " --prompt "A list of " --max-new-tokens 80
.venv/bin/python - <<'PY'
import torch

import mla_fx  # registers the mla_fx ops the program uses
from mla_fx.check import greedy
from mla_fx.models.tokenizer import decode, encode

program = torch.export.load("out/tiny-mla.absorbed.pt2").module()
tokens = greedy(program, torch.tensor([encode("The ")]), 80)
print(f"the absorbed .pt2 generates:\nThe {decode(tokens[0].tolist())}")
PY
