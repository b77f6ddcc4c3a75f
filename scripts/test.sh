#!/usr/bin/env bash
# Set up (see setup.sh), lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# two workers (the CI machine has two cores); a file's tests stay together, so module fixtures are built once
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
