#!/usr/bin/env bash
# The main job on the built-in example: absorb the shipped trained MLA model, check it, write the
# rewritten program, then generate text with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/mla-fx absorb example -o out/tiny-mla.absorbed.pt2 --report out/tiny-mla.report.json
.venv/bin/python - <<'PY'
import torch

import mla_fx  # registers the mla_fx ops the program uses
from mla_fx.check import greedy
from mla_fx.models.tokenizer import decode, encode

program = torch.export.load("out/tiny-mla.absorbed.pt2").module()
prompt = "The "
tokens = greedy(program, torch.tensor([encode(prompt)]), 80)
print(f"absorbed program generates: {prompt + decode(tokens[0].tolist())!r}")
PY
