#!/usr/bin/env bash
# The GPU path in one run, on one GPU, in at most ~8 minutes (no network needed):
#  1. training throughput with torch.compile and bf16 (bench/train_bench.py, one JSON line each):
#     depth 12 at 32 x 2048 and depth 20 at 16 x 2048, vocabulary 65,536, with a validation pass
#     on the same batch (--eval: its peak memory says whether evaluation at that batch fits);
#     nanochat's figures to beat on one H100: MFU 43.1% (d12, B32) and 42.6% (d20, B16);
#  2. validation at depth 20, 32 x 2048, the batch nanochat's speedrun evaluates with;
#  3. every stage for a few steps at depth 12 on TinyWorld (tok, base, mid, sft, rl, eval),
#     so each CUDA path (bf16 autocast, compile, fused kernels, the engine) runs at least once.
# Usage: bash bench/gpu_check.sh [python]   (default .venv/bin/python); artifacts in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$(mktemp -d)}
START=$(date +%s)
say() { echo "== $* ($(( $(date +%s) - START )) s)"; }

say "throughput, depth 12, 32 x 2048"
$PY bench/train_bench.py --depth 12 --device-batch-size 32 --seq-len 2048 --steps 20 --warmup 3 --eval
say "throughput, depth 20, 16 x 2048"
$PY bench/train_bench.py --depth 20 --device-batch-size 16 --seq-len 2048 --steps 10 --warmup 3 --eval
say "validation, depth 20, 32 x 2048"
$PY bench/train_bench.py --depth 20 --device-batch-size 32 --seq-len 2048 --steps 1 --warmup 1 --compile off --eval

say "every stage at depth 12 on TinyWorld"
M=(--depth 12 --aspect-ratio 64 --head-dim 128 --max-seq-len 2048 --eval-batches 2 --eval-every 0 --log-every 1 --eval-items 20)
$PY nanochat_one.py --stage tok --vocab-size 4096 --tok-chars 2000000
$PY nanochat_one.py --stage base "${M[@]}" --device-batch-size 32 --total-batch-size 131072 --num-iterations 6
$PY nanochat_one.py --stage mid "${M[@]}" --device-batch-size 32 --total-batch-size 131072 --num-iterations 4
$PY nanochat_one.py --stage sft "${M[@]}" --device-batch-size 4 --total-batch-size 8192 --num-iterations 4
$PY nanochat_one.py --stage rl "${M[@]}" --device-batch-size 8 --num-iterations 2 --num-samples 8 --prompts-per-step 4 \
    --max-new-tokens 64 --top-k 50 --pass-k 2 --pass-k-problems 16
$PY nanochat_one.py --stage eval --source rl "${M[@]}" --eval-items 20
say "done"
