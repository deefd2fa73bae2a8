"""--stage plan: a run's cost before paying for it, checked against nanochat's published figures
(speedrun.sh for d20, run1000.sh for d32: the same formulas). nanochat unties its head; here wte is
the head, so a model has vocab x width parameters fewer and n_layer x n_kv_head more (the smear
weights), and Chinchilla's 20 tokens a parameter give proportionally fewer steps. The FLOPs per
token are nanochat's exactly: the tied head is still a matmul."""
import pytest

import nanochat_one as nc
import realdata
from conftest import run_stage

GPU_TIER = ["--aspect-ratio", "64", "--head-dim", "128", "--max-seq-len", "2048", "--vocab-size", "65536",
            "--total-batch-size", "524288", "--target-param-data-ratio", "20", "--gpus", "8"]


def test_d20_plan_matches_nanochats_speedrun(capsys):
    plan = run_stage("--stage", "plan", "--depth", "20", "--device-batch-size", "32", *GPU_TIER)
    params = 560_988_160 - 65_536 * 1_280 + 20 * 10  # "The d20 model is 561M parameters", tied, smeared
    assert plan["params"] == params == 477_102_280
    steps = 20 * params // 524_288  # nanochat's formula: 21,400 steps, 11.2B tokens for 561M
    assert plan["base"]["steps"] == steps == 18_200 and plan["base"]["tokens"] == steps * 524_288
    assert plan["base"]["accumulation"] == 1  # 32 x 2048 x 8 GPUs = 524,288
    # nanochat: 216 shards needed for 11.2B tokens at 4.8 characters a token (240 downloaded); fewer tokens here
    assert 216 * 18_200 / 21_400 <= plan["base"]["shards"] <= 250 * 18_200 / 21_400
    assert plan["flops_per_token"] == pytest.approx(3.4918e9, rel=1e-4)
    assert plan["rl"]["steps"] == 467  # one epoch of GSM8K train, 16 problems a step
    assert plan["sft"]["steps"] == (2_251 + 1_119 + 7_473 + 10_000) // 32
    out = capsys.readouterr().out
    assert "| base | 9.54B tokens (20.0 per parameter) | 18,200 |" in out and "477,102,280 parameters" in out


def test_d32_plan_matches_nanochats_run1000():
    plan = run_stage("--stage", "plan", "--depth", "32", "--device-batch-size", "8", *GPU_TIER)
    # run1000.sh's log: "Number of parameters: 1,879,048,192", "Estimated FLOPs per token: 1.207960e+10",
    # "Calculated number of iterations ...: 71,680", "Total number of training tokens: 37,580,963,840"
    params = 1_879_048_192 - 65_536 * 2_048 + 32 * 16  # tied, smeared
    assert plan["params"] == params
    assert plan["flops_per_token"] == pytest.approx(1.207960e10, rel=1e-6)
    steps = 20 * params // 524_288  # nanochat's formula, which gives it 71,680
    assert plan["base"]["steps"] == steps == 66_560 and plan["base"]["tokens"] == steps * 524_288
    assert plan["base"]["accumulation"] == 4
    assert 740 * 66_560 / 71_680 <= plan["base"]["shards"] <= 820 * 66_560 / 71_680  # nanochat: ~740 needed, 800 downloaded


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
