"""Worker for tests/test_ddp.py: train a tiny GPT with nanochat_one.train on fixed synthetic
micro-batches, either as one plain process or as one rank of a torchrun job.

    python tests/ddp_worker.py OUT                                                 # one process
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT --with-stage  # two ranks (gloo)

The data: global micro-batch g is drawn from a generator seeded with g, and rank r of W
processes gets every g with g % W == r (as base_batches shards documents by position). In one
optimizer step rank r runs its micro-batches k = A*s .. A*s+A-1, i.e. global batches W*k + r,
so the W ranks together see global batches W*A*s .. W*A*s + W*A - 1: exactly what one process
with W*A accumulation steps sees. Averaged over ranks and micro-steps, the gradients agree.

Each rank uses its own artifacts directory, OUT/rank<r>, so the test can tell which ranks wrote
checkpoints and reports. Each rank leaves OUT/rank<r>/result.pt: the final weights, the
micro-step numbers at which DDP all-reduced gradients, and with --with-stage the summary of a
short run of the real base stage (TinyWorld documents, sharded by position) after the comparison.
"""
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bpe  # noqa: E402
import nanochat_one as nc  # noqa: E402

VOCAB = 64
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "16", "--max-seq-len", "16",
        "--device-batch-size", "2", "--log-every", "1", "--compile", "off"]


class CountingDDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that records, for every gradient all-reduce, how many forward
    passes (micro-steps) it had run by then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwards, self.reduced_at = 0, []
        CountingDDP.last = self

        def hook(state, bucket):
            self.reduced_at.append(self.forwards)
            return allreduce_hook(None, bucket)

        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        self.register_comm_hook(None, hook)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return super().forward(*args, **kwargs)


def synthetic_batches(ddp, B, T, split, start=0):
    """Yield (inputs, targets, g) for this rank's global micro-batches g >= start."""
    for g in itertools.count(start):
        if g % ddp.world_size == ddp.rank:
            generator = torch.Generator().manual_seed(2 * g + (split == "val"))
            batch = torch.randint(0, VOCAB, (B, T + 1), generator=generator)
            yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), g


def main(out, with_stage=False):
    torch.set_num_threads(1)  # as torchrun sets for each rank: the same summation order everywhere
    ddp = nc.init_distributed()
    run_dir = Path(out) / f"rank{ddp.rank}"
    os.environ["NANOCHAT_BASE_DIR"] = str(run_dir)
    # the same arguments everywhere: 128 tokens per step are 4 micro-batches of 2 x 16 in one
    # process, or 2 micro-batches on each of 2 ranks
    args = nc.build_parser().parse_args(["--stage", "base", *TINY, "--model-tag", "t", "--total-batch-size", "128",
                                         "--num-iterations", "4", "--eval-every", "0", "--save-every", "2"])
    torch.nn.parallel.DistributedDataParallel = CountingDDP  # train() builds its DDP wrapper from here
    torch.manual_seed(0)
    model = nc.GPT(nc.config_from_depth(2, VOCAB, 16, aspect_ratio=32, head_dim=16))
    model.init_weights()
    tokenizer = bpe.Tokenizer.train(["tiny text for a tokenizer id " * 20], 280, special_tokens=nc.SPECIAL_TOKENS)

    def make_batches(split, start=0):
        return synthetic_batches(ddp, args.device_batch_size, args.max_seq_len, split, start)

    def evaluate(model):  # validation batches 0..3 in all, whatever the number of ranks
        return dict(val_loss=nc.evaluate_loss(model, make_batches("val"), 4 // ddp.world_size))

    summary = nc.train(args, ddp, "base", model, tokenizer, make_batches, evaluate, args.num_iterations)
    result = dict(state=model.state_dict(), summary=summary,
                  reduced_at=CountingDDP.last.reduced_at if ddp.is_ddp else None)
    if with_stage:
        # the whole base stage on TinyWorld text, as the CLI runs it: sharded documents, val
        # bits-per-byte all-reduced, samples, checkpoint and report (these two on rank 0 only)
        nc.tokenizer_path().parent.mkdir(parents=True)
        tokenizer.save(nc.tokenizer_path())
        stage_args = nc.build_parser().parse_args(["--stage", "base", *TINY, "--model-tag", "s", "--total-batch-size", "128",
                                                   "--num-iterations", "2", "--eval-every", "0", "--eval-batches", "2",
                                                   "--sample-prompts", "The"])
        result["stage_summary"] = nc.stage_base(stage_args, ddp)
    torch.save(result, run_dir / "result.pt")
    if ddp.is_ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], with_stage="--with-stage" in sys.argv[2:])
