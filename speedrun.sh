#!/usr/bin/env bash
# The whole pipeline on the embedded TinyWorld data, at a depth a laptop CPU trains in minutes:
#   set up .venv -> train the tokenizer -> pretrain the base model -> write report.md
# Usage: bash speedrun.sh            (any extra arguments go to every training stage)
# Artifacts go to $NANOCHAT_BASE_DIR (default ./runs); the report to ./report.md.
# On a GPU machine the same script uses the GPU; TORCH_SPEC picks the torch build to install.
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)

if [ ! -x .venv/bin/python ]; then
  echo "== setting up .venv"
  python3 -m venv .venv
fi
# torch first and pinned: a plain `pip install torch` would pick whatever is newest
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install -q -e .
PY=.venv/bin/python

echo "== stage tok"
$PY nanochat_one.py --stage tok
echo "== stage base"
$PY nanochat_one.py --stage base "$@"
echo "== report"
$PY nanochat_one.py --stage report --wall-seconds $(( $(date +%s) - START ))
