"""Resume in every training stage: SIGKILL a run in the middle of a step, continue it with
--resume, and the finished run equals the uninterrupted one, bit for bit.

Why bit for bit is the right tolerance: the resumed run reloads the exact fp32 weights and
optimizer state of the checkpoint, its loaders restart from the saved state (the packer's buffer
included) and its RL problems and samples are seeded by the step, so every later step repeats the
same operations on the same numbers, in one process as in the other (both pinned to one thread)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanochat_one as nc
from conftest import TINY_TOK, run_stage, train_in

WORKER = Path(__file__).resolve().parent / "kill_worker.py"
# not conftest.TINY: half the rows and tokens a step (4 rows of 64, 512 tokens), one eval batch, no evaluation
# during a run and 2 items per chat evaluation, to keep short the runs that each stage repeats (whole, killed, resumed)
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", "--eval-batches", "1", "--log-every", "100", "--eval-every", "0", "--eval-items", "2"]
RL = ["--prompts-per-step", "2", "--num-samples", "4", "--max-new-tokens", "12", "--pass-k-problems", "2", "--lr-scale", "1"]
# stage, its flags, steps, checkpoint every, SIGKILL in the step after this checkpoint
STAGES = [("base", ["--num-iterations", "5"], 2, 2),
          ("mid", ["--num-iterations", "5"], 2, 2),
          ("sft", ["--num-iterations", "5"], 2, 2),
          ("rl", ["--num-iterations", "3", *RL], 1, 1)]
SOURCE = dict(mid="base", sft="mid", rl="sft")  # where each stage starts (base: from scratch)


def fake_reward(text, reference):
    """A reward that a tiny untrained model earns on some samples and not others, so that every RL
    step has groups with signal (the real grader would give all zeros here and no update)."""
    return len(text) % 3 == 0


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tokenizer and tiny base, mid and sft checkpoints for the stages to start from."""
    return train_in(tmp_path_factory.mktemp("sources"), TINY_TOK,
                    *(["--stage", stage, *TINY, "--num-iterations", "3"] for stage in ("base", "mid", "sft")))


@pytest.mark.parametrize("stage, flags, save_every, kill_after", STAGES, ids=[s[0] for s in STAGES])
def test_sigkill_then_resume_equals_uninterrupted(stage, flags, save_every, kill_after, sources, tmp_path, monkeypatch):
    argv = ["--stage", stage, *TINY, *flags, "--save-every", str(save_every)]
    monkeypatch.setattr(nc, "answer_is_correct", fake_reward)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (OMP_NUM_THREADS=1): the same kernels in every run
    try:
        # the uninterrupted run
        whole = tmp_path / "whole"
        shutil.copytree(sources, whole)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(whole))
        run_stage(*argv)
        # the same run, killed in the step after checkpoint `kill_after`, then resumed
        killed = tmp_path / "killed"
        shutil.copytree(sources, killed)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(killed))
        env = dict(os.environ, OMP_NUM_THREADS="1", NANOCHAT_DEVICE="cpu")
        result = subprocess.run([sys.executable, str(WORKER), str(kill_after), *(["--fake-reward"] if stage == "rl" else []),
                                 "--", *argv], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == -9, result.stderr[-3000:]  # it died by SIGKILL
        directory = nc.checkpoint_dir(stage, "d2")
        assert nc.last_checkpoint_step(directory) == kill_after
        run_stage(*argv, "--resume")
    finally:
        torch.set_num_threads(threads)
    def final(directory, stage):
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(directory))
        model, _, meta = nc.load_checkpoint(stage, "d2", "cpu")
        return model.state_dict(), meta

    (weights, meta), (resumed, resumed_meta) = final(whole, stage), final(killed, stage)
    assert meta["step"] == resumed_meta["step"] == int(flags[1])
    assert meta.get("data_state") == resumed_meta.get("data_state")  # the loaders stopped at the same place
    differences = {name: (w - resumed[name]).abs().max().item() for name, w in weights.items()}
    assert max(differences.values()) == 0.0, differences
    # the stage really moved the weights (RL too: the fake reward gives its groups signal)
    key = "transformer.h.0.attn.c_proj.weight"  # zero at init
    start = final(sources, SOURCE[stage])[0][key] if stage in SOURCE else 0.0
    assert (weights[key] - start).abs().max() > 0
