"""Two CPU processes under torchrun (gloo) against one process with twice the accumulation.

tests/ddp_worker.py trains the same tiny GPT on the same synthetic micro-batches both ways (see
its docstring for why the two runs see the same data in every optimizer step). At every step,
the gradient averaged over 2 ranks x 2 micro-steps must be the gradient of 1 process x 4
micro-steps up to the rounding of adding 4 terms in another order, and the step must move the
weights where one process would, within the bound that the optimizers' formulas put on that
gradient difference; DDP must all-reduce only on the last micro-step; only rank 0 may write."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def finish(process, name):
    out, _ = process.communicate(timeout=180)
    assert process.returncode == 0, f"{name} run failed:\n{out[-4000:]}"


def test_two_ranks_match_one_process_with_double_accumulation(tmp_path):
    env = dict(os.environ, NANOCHAT_DEVICE="cpu", OMP_NUM_THREADS="1")
    env.pop("NANOCHAT_BASE_DIR", None)
    run = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # both runs at once: they are independent, and starting Python + torch is most of the time
    single = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "single")], **run)
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(WORKER), str(tmp_path / "ddp"), "--with-stage"], **run)
    finish(single, "single-process")
    finish(ddp, "torchrun")

    one = torch.load(tmp_path / "single" / "rank0" / "result.pt", weights_only=False)
    rank0 = torch.load(tmp_path / "ddp" / "rank0" / "result.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "ddp" / "rank1" / "result.pt", weights_only=False)
    # every rank applied the same update to the same weights
    for name, w in rank0["state"].items():
        assert torch.equal(w, rank1["state"][name]), name
    # ... and that update is the one-process update with twice the accumulation: at each of the
    # 4 steps, the all-reduced gradient and the weights after the step are within their bounds
    # (a ratio of the largest difference to its bound, over all elements; see StepCheck)
    assert rank0["state"]["transformer.h.0.attn.c_proj.weight"].abs().max() > 1e-3  # it trained (c_proj starts at zero)
    assert len(rank0["grad_ratios"]) == len(rank0["weight_ratios"]) == 4
    assert max(rank0["grad_ratios"]) <= 1.0, rank0["grad_ratios"]
    assert max(rank0["weight_ratios"]) <= 1.0, rank0["weight_ratios"]
    assert rank0["weight_ratios"] == rank1["weight_ratios"]
    # validation loss is all-reduced: 2 ranks x 2 batches = 1 process x 4 batches, with the same weights
    # (the same float32 per-batch sums, added in float64 in another order: ~1e-16 relative)
    assert rank0["summary"]["metrics"]["val_loss"] == pytest.approx(rank0["one_process_val_loss"], rel=1e-12)
    assert rank0["summary"]["metrics"] == rank1["summary"]["metrics"]

    # gradients were all-reduced (once per bucket) only on the last of each step's 2 micro-steps
    for result in (rank0, rank1):
        assert sorted(set(result["reduced_at"])) == [2, 4, 6, 8]
        assert len(result["reduced_at"]) % 4 == 0

    # rank 0 wrote the checkpoints and the report; rank 1 wrote nothing
    checkpoint = tmp_path / "ddp" / "rank0" / "checkpoints" / "base" / "t" / "model_000004.pt"
    for name, w in torch.load(checkpoint, weights_only=True).items():
        assert torch.equal(w, rank0["state"][name]), name
    meta = json.loads((tmp_path / "ddp" / "rank0" / "checkpoints" / "base" / "s" / "meta_000002.json").read_text())
    # each rank's packer state, to resume exactly: rank r holds only documents at positions r mod 2
    assert [{p % 2 for p in state["buffer"]} for state in meta["data_state"]] == [{0}, {1}]
    assert (tmp_path / "ddp" / "rank0" / "report" / "base.json").exists()
    assert sorted(p.name for p in (tmp_path / "ddp" / "rank1").iterdir()) == ["result.pt", "tokenizer"]
    # the real base stage: val bits-per-byte is all-reduced, so both ranks report the same number
    assert rank0["stage_summary"]["val_bpb"] == rank1["stage_summary"]["val_bpb"] > 0


STAGE_WORKER = Path(__file__).resolve().parent / "stage_worker.py"


def test_mid_sft_and_rl_under_two_ranks_keep_the_ranks_in_step(tmp_path):
    """The real mid, SFT and RL stages under torchrun (2 gloo processes, TinyWorld sharded by
    position, RL's uneven rows per rank): each runs to its end, both ranks hold the same weights
    after it, and rank 0's checkpoint is those weights. (That one process would reach the same
    weights is checked above for the training loop these stages share; their real loaders and
    RL's sampling give each rank its own data, so a one-process run sees other batches.)"""
    runs = tmp_path / "runs"
    env = dict(os.environ, NANOCHAT_DEVICE="cpu", OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(runs))
    run = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    model = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "32", "--device-batch-size", "2",
             "--log-every", "1", "--compile", "off", "--eval-batches", "1", "--eval-every", "0", "--eval-items", "2"]
    root = Path(__file__).resolve().parent.parent
    for argv in (["--stage", "tok", "--vocab-size", "300", "--tok-chars", "20000"],
                 ["--stage", "base", *model, "--total-batch-size", "64", "--num-iterations", "2"]):
        finish(subprocess.Popen([sys.executable, str(root / "nanochat_one.py"), *argv], **run), argv[1])
    for stage, flags in (("mid", ["--total-batch-size", "128", "--num-iterations", "3"]),
                         ("sft", ["--total-batch-size", "128", "--num-iterations", "3"]),
                         ("rl", ["--num-iterations", "2", "--prompts-per-step", "3", "--num-samples", "2",
                                 "--max-new-tokens", "8", "--pass-k", "2", "--pass-k-problems", "4"])):
        out = tmp_path / stage
        out.mkdir()
        finish(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(STAGE_WORKER), str(out), "--stage", stage, *model, *flags], **run), stage)
        rank0, rank1 = (torch.load(out / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
        checkpoint = torch.load(next((runs / "checkpoints" / stage / "d2").glob("model_*.pt")), weights_only=True)
        for name, w in rank0.items():
            assert torch.equal(w, rank1[name]) and torch.equal(w, checkpoint[name]), (stage, name)
