#!/usr/bin/env bash
# Set up .venv with the development extras and run the test suite (CPU only; GPU tests skip).
# Usage: bash tests/run.sh [--all] [pytest arguments]
#   the default run tests every module and checks that the lessons' saved outputs come from the current
#   code; --all also executes the ten lessons top to bottom (CI: those that train nothing, 00-03 and 09)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
read -ra TORCH_ARGS <<< "${TORCH_SPEC:-torch==2.13.0}"  # a version, then pip options (--index-url URL)
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${TORCH_ARGS[@]}"
.venv/bin/pip install -q -e ".[dev]"
exec .venv/bin/python -m pytest "$@"
