#!/usr/bin/env bash
# Create .venv and install mla-fx with its test tools. Idempotent: a second run installs nothing new.
# torch goes first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install -q -e ".[dev]"
