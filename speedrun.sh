#!/usr/bin/env bash
# The whole pipeline, then report.md:
#   set up .venv -> tok -> base -> mid -> sft -> rl -> report
#
# Usage: bash speedrun.sh [tier] [extra flags for every training stage]
#   tiny (default)  TinyWorld, depth 4, on whatever device exists: minutes on a laptop CPU
#   d20             nanochat's speedrun on one 8-GPU node (torchrun): 477M parameters (nanochat's 561M less
#                   the untied head), 9.5B FineWeb-EDU tokens, then an epoch each of mid (SmolTalk/MMLU/GSM8K),
#                   SFT (ARC/GSM8K/SmolTalk), RL (GSM8K)
#   d26             the same at depth 26 (~1.0B parameters), d32 at depth 32 (~1.7B, 34.9B tokens)
# The GPU tiers print their plan (python nanochat_one.py --stage plan) and download the FineWeb-EDU
# shards the base run needs in one process before torchrun starts.
# Artifacts go to $NANOCHAT_BASE_DIR (default ./runs); the report to ./report.md.
# TORCH_SPEC picks the torch build to install (default torch==2.13.0; the CPU build:
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"); NPROC the GPUs per node.
set -euo pipefail
cd "$(dirname "$0")"
START=$(date +%s)
TIER=tiny
case "${1:-}" in tiny|d20|d26|d32) TIER=$1; shift ;; esac

if [ ! -x .venv/bin/python ]; then
  echo "== setting up .venv"
  python3 -m venv .venv
fi
# torch first and pinned: a plain `pip install torch` would pick whatever is newest
# TORCH_SPEC is split into words (a version, then pip options such as --index-url URL), never globbed
read -ra TORCH_ARGS <<< "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${TORCH_ARGS[@]}"
if [ "$TIER" = tiny ]; then .venv/bin/pip install -q -e .; else .venv/bin/pip install -q -e ".[hf]"; fi  # hf: real data
PY=.venv/bin/python

if [ "$TIER" = tiny ]; then
  RUN="$PY nanochat_one.py"
  MODEL=()
  TRAIN=()
else
  NPROC=${NPROC:-8}
  DEPTH=${TIER#d}
  case $TIER in d20) BATCH=32 ;; d26) BATCH=16 ;; d32) BATCH=8 ;; esac  # rows per GPU that fit in 80 GB, as nanochat
  RUN=".venv/bin/torchrun --standalone --nproc_per_node=$NPROC nanochat_one.py"
  MODEL=(--depth "$DEPTH" --aspect-ratio 64 --head-dim 128 --max-seq-len 2048 --data hf)
  TRAIN=(--device-batch-size "$BATCH" --total-batch-size 524288 --eval-every 250 --save-every 1000 --log-every 10)
  # nanochat's SFT: 4 conversations per GPU a step, LR 0.02 of base's decaying linearly to 0; RL: 16 x 16 samples
  SFT=(--device-batch-size 4 --total-batch-size $((4 * 2048 * NPROC)) --lr-scale 0.02 --matrix-lr 0.02 --embedding-lr 0.05 --warmdown-ratio 1.0 --eval-every 100)
  RL=(--num-samples 16 --prompts-per-step 16 --max-new-tokens 256 --top-k 50 --device-batch-size 8 --eval-every 60)
  $PY nanochat_one.py --stage plan "${MODEL[@]}" "${TRAIN[@]}" --vocab-size 65536 --target-param-data-ratio 20 --gpus "$NPROC"
fi
echo "== plan: tier $TIER on $($PY -c 'import nanochat_one as n; print(n.DEVICE_TYPE)'), stages tok base mid sft rl"

stage() { echo "== stage $1 ($(date +%T))"; "${@:2}"; }
if [ "$TIER" = tiny ]; then
  stage tok  $PY nanochat_one.py --stage tok
else  # one process: it downloads the shards the base run needs (its flags tell how many), then trains the BPE
  stage tok  $PY nanochat_one.py --stage tok "${MODEL[@]}" "${TRAIN[@]}" --target-param-data-ratio 20 \
    --vocab-size 65536 --tok-chars 2000000000
fi
EXTRA=("$@")
base_flags=("${MODEL[@]}" "${TRAIN[@]}")
[ "$TIER" = tiny ] || base_flags+=(--target-param-data-ratio 20)
stage base $RUN --stage base "${base_flags[@]}" "${EXTRA[@]}"
stage eval $RUN --stage eval --source base "${MODEL[@]}"
stage mid  $RUN --stage mid "${MODEL[@]}" "${TRAIN[@]}" "${EXTRA[@]}"
if [ "$TIER" = tiny ]; then
  stage sft  $RUN --stage sft "${MODEL[@]}" "${TRAIN[@]}" "${EXTRA[@]}"
  stage rl   $RUN --stage rl "${MODEL[@]}" "${EXTRA[@]}"
else
  stage sft  $RUN --stage sft "${MODEL[@]}" "${SFT[@]}" "${EXTRA[@]}"
  stage rl   $RUN --stage rl "${MODEL[@]}" "${RL[@]}" "${EXTRA[@]}"
fi
if [ "$TIER" != tiny ]; then  # real tasks (ARC, MMLU, GSM8K) and ChatCORE for report.md's chat table
  for source in mid sft rl; do stage eval $RUN --stage eval --source $source "${MODEL[@]}"; done
fi
stage report $PY nanochat_one.py --stage report "${MODEL[@]}" --wall-seconds $(( $(date +%s) - START ))
