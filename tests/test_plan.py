"""--stage plan: a run's cost before paying for it, checked against nanochat's published figures
(speedrun.sh for d20, run1000.sh for d32: the same architecture and the same formulas)."""
import pytest

import nanochat_one as nc
import realdata
from conftest import run_stage

GPU_TIER = ["--aspect-ratio", "64", "--head-dim", "128", "--max-seq-len", "2048", "--vocab-size", "65536",
            "--total-batch-size", "524288", "--target-param-data-ratio", "20", "--gpus", "8"]


def test_d20_plan_matches_nanochats_speedrun(capsys):
    plan = run_stage("--stage", "plan", "--depth", "20", "--device-batch-size", "32", *GPU_TIER)
    assert plan["params"] == 560_988_160  # "The d20 model is 561M parameters"
    assert plan["base"]["steps"] == 21_400 and plan["base"]["tokens"] == 11_219_763_200  # 20 x 561M = 11.2B tokens
    assert plan["base"]["accumulation"] == 1  # 32 x 2048 x 8 GPUs = 524,288
    assert 216 <= plan["base"]["shards"] <= 250  # nanochat: 216 needed at 4.8 characters a token, 240 downloaded
    assert plan["flops_per_token"] == pytest.approx(3.4918e9, rel=1e-4)
    assert plan["rl"]["steps"] == 467  # one epoch of GSM8K train, 16 problems a step
    assert plan["sft"]["steps"] == (2_251 + 1_119 + 7_473 + 10_000) // 32
    out = capsys.readouterr().out
    assert "| base | 11.22B tokens (20.0 per parameter) | 21,400 |" in out and "560,988,160 parameters" in out


def test_d32_plan_matches_nanochats_run1000():
    plan = run_stage("--stage", "plan", "--depth", "32", "--device-batch-size", "8", *GPU_TIER)
    # run1000.sh's log: "Number of parameters: 1,879,048,192", "Estimated FLOPs per token: 1.207960e+10",
    # "Calculated number of iterations ...: 71,680", "Total number of training tokens: 37,580,963,840"
    assert plan["params"] == 1_879_048_192
    assert plan["flops_per_token"] == pytest.approx(1.207960e10, rel=1e-6)
    assert plan["base"]["steps"] == 71_680 and plan["base"]["tokens"] == 37_580_963_840
    assert plan["base"]["accumulation"] == 4
    assert 740 <= plan["base"]["shards"] <= 820  # nanochat: ~740 needed, 800 downloaded


def test_plan_refuses_a_batch_that_does_not_divide():
    with pytest.raises(nc.UserError, match="must be a multiple"):
        run_stage("--stage", "plan", "--depth", "20", "--device-batch-size", "24", *GPU_TIER)


def test_tok_downloads_the_shards_the_base_run_needs(base_dir, monkeypatch):
    """--num-shards left out: the number the plan gives (speedrun's GPU tiers download them in
    --stage tok, one process, before torchrun starts)."""
    class Downloaded(Exception):
        pass

    asked = []
    monkeypatch.setattr(realdata, "download_shards", lambda directory, n: asked.append(n))
    monkeypatch.setattr(nc, "document_stream", lambda *a, **k: (_ for _ in ()).throw(Downloaded()))  # stop there
    flags = ["--depth", "20", "--device-batch-size", "32", *GPU_TIER]
    with pytest.raises(Downloaded):
        run_stage("--stage", "tok", "--data", "hf", *flags)
    assert asked == [run_stage("--stage", "plan", *flags)["base"]["shards"]]
