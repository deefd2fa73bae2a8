"""bench/train_bench.py runs at tiny size on the CPU and prints one JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_bench.py"


def test_train_bench_prints_one_json_line():
    result = subprocess.run([sys.executable, str(BENCH), "--depth", "1", "--device-batch-size", "2", "--seq-len", "32",
                             "--head-dim", "16", "--aspect-ratio", "32", "--vocab-size", "256", "--steps", "2",
                             "--warmup", "1", "--compile", "off"],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, NANOCHAT_DEVICE="cpu"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["tok_per_s"] > 0 and report["peak_memory_mb"] > 0
    assert report["mfu"] is None and report["memory"] == "peak_rss"  # no GPU peak to compare with
    assert (report["n_embd"], report["n_head"], report["seq_len"]) == (32, 2, 32)
