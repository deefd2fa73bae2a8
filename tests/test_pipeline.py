"""End to end on tiny settings: tokenizer, a base run whose loss falls, checkpoints, resume, CLI errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import nanochat_one as nc
from conftest import TINY, TINY_TOK, hello_tokenizer, run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tokenizer(base_dir):
    run_stage(*TINY_TOK)
    return nc.get_tokenizer()


def test_tok_stage_writes_tokenizer_and_report(tokenizer, base_dir):
    assert tokenizer.vocab_size <= 512
    assert list(tokenizer.special_tokens) == nc.SPECIAL_TOKENS
    report = json.loads((base_dir / "report" / "tok.json").read_text())
    assert report["val_bytes_per_token"] > 1.5


def test_base_loss_falls_and_resume_continues(tokenizer, base_dir):
    summary = run_stage("--stage", "base", *TINY, "--num-iterations", "30", "--eval-every", "10", "--save-every", "0")
    curve = [h["val_bpb"] for h in summary["history"]]
    assert curve[-1] < 0.7 * curve[0]
    directory = nc.checkpoint_dir("base", "d2")
    assert nc.last_checkpoint_step(directory) == 30
    summary = run_stage("--stage", "base", *TINY, "--num-iterations", "35", "--eval-every", "0", "--resume")
    assert nc.last_checkpoint_step(directory) == 35
    meta = json.loads((directory / "meta_000035.json").read_text())
    assert meta["step"] == 35 and meta["model_config"]["n_layer"] == 2
    assert sorted(p.name for p in directory.iterdir()) == ["meta_000035.json", "model_000035.pt", "optim_000035.pt"]


def test_checkpoint_round_trip_gives_identical_logits(base_dir):
    torch.manual_seed(0)
    config = nc.GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    model = nc.GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    optimizers = nc.setup_optimizers(model)
    meta = dict(step=3, model_config=vars(config) | {})
    nc.save_checkpoint(nc.checkpoint_dir("base", "t"), 3, model, optimizers, meta)
    loaded, optim_states, meta2 = nc.load_checkpoint("base", "t", "cpu", with_optimizer=True)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(model(idx), loaded(idx))
    assert meta2["step"] == 3 and len(optim_states) == 2


def cli(*argv, env_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(env_dir))
    return subprocess.run([sys.executable, os.path.join(ROOT, "nanochat_one.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:") or "error:" in l]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_unknown_stage(tmp_path):
    assert_one_line_error(cli("--stage", "pretrain", env_dir=tmp_path), "invalid choice")


def test_cli_missing_tokenizer_and_checkpoint(tmp_path):
    assert_one_line_error(cli("--stage", "base", env_dir=tmp_path), "--stage tok")
    (tmp_path / "tokenizer").mkdir(parents=True)
    hello_tokenizer().save(tmp_path / "tokenizer" / "tokenizer.json")
    assert_one_line_error(cli("--stage", "base", "--resume", env_dir=tmp_path), "no base checkpoint")


def test_cli_bad_depth_and_batch(tmp_path):
    assert_one_line_error(cli("--stage", "base", "--depth", "0", env_dir=tmp_path), "--depth")
    (tmp_path / "tokenizer").mkdir(parents=True)
    hello_tokenizer().save(tmp_path / "tokenizer" / "tokenizer.json")
    assert_one_line_error(cli("--stage", "base", "--depth", "4", "--n-kv-head", "3", env_dir=tmp_path), "--n-kv-head")
    assert_one_line_error(cli("--stage", "base", "--total-batch-size", "1000", env_dir=tmp_path), "--total-batch-size")


def test_cli_truncated_checkpoint(tokenizer, base_dir):
    run_stage("--stage", "base", *TINY, "--num-iterations", "2", "--eval-every", "0")
    path = nc.checkpoint_dir("base", "d2") / "model_000002.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = cli("--stage", "base", *TINY, "--num-iterations", "4", "--resume", env_dir=base_dir)
    assert_one_line_error(result, "truncated or corrupt")
