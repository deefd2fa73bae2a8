"""Worker for tests/test_ddp.py: train a tiny GPT with nanochat_one.train on fixed synthetic
micro-batches, either as one plain process or as one rank of a torchrun job.

    python tests/ddp_worker.py OUT                                                 # one process
    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT --with-stage  # two ranks (gloo)

The data: global micro-batch g is drawn from a generator seeded with g, and rank r of W
processes gets every g with g % W == r (as base_batches shards documents by position). In one
optimizer step rank r runs its micro-batches k = A*s .. A*s+A-1, i.e. global batches W*k + r,
so the W ranks together see global batches W*A*s .. W*A*s + W*A - 1: exactly what one process
with W*A accumulation steps sees. Averaged over ranks and micro-steps, the gradients agree.

Under torchrun every optimizer step is also checked against the one process it replaces, from
the same weights and optimizer state (StepCheck below): the all-reduced gradient against the
one-process accumulation over the same W*A micro-batches, and the weights after the step against
the weights that one process would reach. The bounds for both come from the arithmetic, not from
a run: see StepCheck. (Comparing the two runs' final weights directly is ill-conditioned: AdamW's
first steps are close to lr * g / (|g| + eps), whose slope near g = 0 is lr / eps = 1e10 * lr, so
an embedding row whose gradient almost cancels turns a 1e-15 rounding difference into 1e-5.)

Each rank uses its own artifacts directory, OUT/rank<r>, so the test can tell which ranks wrote
checkpoints and reports. Each rank leaves OUT/rank<r>/result.pt: the final weights, the
micro-step numbers at which DDP all-reduced gradients, the per-step checks, and with --with-stage
the summary of a short run of the real base stage (TinyWorld documents, sharded by position).
"""
import copy
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bpe  # noqa: E402
import nanochat_one as nc  # noqa: E402

setup_optimizers = nc.setup_optimizers  # the real one (main() swaps in a checking wrapper)

VOCAB = 64
# not conftest.TINY, on purpose: micro-batches of 2 rows x 16 tokens make a step of 128 tokens 4 micro-steps in
# one process or 2 on each of 2 ranks, as test_ddp.py counts them
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


def synthetic_batch(g, B, T, split="train"):
    """Global micro-batch g: (inputs, targets) of (B, T) random tokens."""
    generator = torch.Generator().manual_seed(2 * g + (split == "val"))
    batch = torch.randint(0, VOCAB, (B, T + 1), generator=generator)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def synthetic_batches(ddp, B, T, split, start=0):
    """Yield (inputs, targets, g) for this rank's global micro-batches g >= start."""
    for g in itertools.count(start):
        if g % ddp.world_size == ddp.rank:
            yield *synthetic_batch(g, B, T, split), g


UNIT = 2.0 ** -24  # float32 unit roundoff
# Muon's 5 Newton-Schulz steps map singular values in [0, 1.21] into [0, 1.21] with slope at most
# 4.25 (max |a + 3b x^2 + 5c x^4| there is 4.24), so the whole iteration is at most 4.25^5-Lipschitz
NEWTON_SCHULZ_LIPSCHITZ = 4.25 ** 5


class StepCheck:
    """Optimizer hooks that check each DDP step against the one process it replaces.

    Before the step (AdamW, the first optimizer, is about to run): recompute the gradient as one
    process would, on an unwrapped copy of the model with the same weights, accumulating the
    step's W*A global micro-batches in order. Each micro-batch gradient g_i is computed by the same
    kernels with one thread either way, so the two sums differ only in the order of adding the
    W*A terms: |ddp - one| <= 2 (W*A - 1) u sum_i |g_i / (W*A)|. Record the largest ratio.

    After the step (Muon, the last, has run): step a copy of both optimizers, with the same state,
    on the one-process gradient, and bound how far apart the weights may be from the gradient
    difference d = |ddp - one|. AdamW: m_hat moves by (1 - b1) d / bc1 and sqrt(v_hat) by at most
    sqrt((1 - b2) / bc2) d, so lr * m_hat / (sqrt(v_hat) + eps) moves by at most
    lr * (d (1 - b1) / bc1 / D + |m_hat| sqrt((1 - b2) / bc2) d / D^2) with D = sqrt(v_hat) + eps.
    Muon: the Nesterov update moves by at most d, its normalisation by 2 |d|_F / |G|_F, and
    Newton-Schulz by at most NEWTON_SCHULZ_LIPSCHITZ times that (Frobenius norms, which bound every
    element). Each side also rounds the update it applies: a few units in the last place of the
    weight and of the update, counted generously as 64 u (|w| + |update|)."""

    def __init__(self, model, optimizers, ddp, grad_accum, batch):
        self.model, self.optimizers, self.ddp, self.accum, self.batch = model, optimizers, ddp, grad_accum, batch
        self.step, self.grad_ratios, self.weight_ratios = 0, [], []
        optimizers[0].register_step_pre_hook(lambda *_: self.before())
        optimizers[-1].register_step_post_hook(lambda *_: self.after())

    def before(self):
        n = self.ddp.world_size * self.accum
        reference = copy.deepcopy(self.model)
        partials = []
        for g in range(n * self.step, n * (self.step + 1)):
            reference.zero_grad(set_to_none=True)
            x, y = self.batch(g)
            (reference(x, y) / n).backward()
            partials.append({name: p.grad.clone() for name, p in reference.named_parameters()})
        self.one, worst = {}, 0.0
        for name, p in self.model.named_parameters():
            one = partials[0][name].clone()
            for part in partials[1:]:
                one += part[name]  # in the order one process accumulates them
            bound = 2 * (n - 1) * UNIT * sum(part[name].abs() for part in partials)
            worst = max(worst, ratio(p.grad - one, bound))
            self.one[name] = one
        self.grad_ratios.append(worst)
        self.reference = reference
        self.reference_optimizers = setup_optimizers(reference)
        for mine, theirs in zip(self.reference_optimizers, self.optimizers):
            mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
        self.ddp_grads = {name: p.grad.clone() for name, p in self.model.named_parameters()}

    def after(self):
        params = dict(self.reference.named_parameters())
        for name, p in params.items():
            p.grad = self.one[name]
        for opt in self.reference_optimizers:
            opt.step()
        adamw, muon = self.reference_optimizers
        worst = 0.0
        for name, w in self.model.named_parameters():
            ref = params[name]
            d = (self.ddp_grads[name] - self.one[name]).abs()
            update = (w.detach() - ref.detach()).abs()
            group = next(g for opt in self.reference_optimizers for g in opt.param_groups if any(q is ref for q in g["params"]))
            if group in adamw.param_groups:
                state, (b1, b2) = adamw.state[ref], group["betas"]
                t = float(state["step"])
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                m_hat, D = state["exp_avg"].abs() / bc1, (state["exp_avg_sq"] / bc2).sqrt() + group["eps"]
                step_size = group["lr"] * m_hat / D
                bound = group["lr"] * (d * (1 - b1) / bc1 / D + m_hat * ((1 - b2) / bc2) ** 0.5 * d / D ** 2)
            else:
                G = self.one[name].lerp(muon.state[ref]["momentum_buffer"], group["momentum"])
                scale = max(1.0, w.size(-2) / w.size(-1)) ** 0.5
                step_size = group["lr"] * scale * torch.ones_like(w)  # orthogonalised entries are at most ~1
                rel = 2 * d.norm() / G.norm() if G.norm() > 0 else torch.tensor(0.0)
                bound = group["lr"] * scale * NEWTON_SCHULZ_LIPSCHITZ * rel * torch.ones_like(w)
            bound = bound + 64 * UNIT * (ref.detach().abs() + step_size)
            worst = max(worst, ratio(update, bound))
        self.weight_ratios.append(worst)
        # continue the DDP run from its own weights: the reference only checks this one step
        self.step += 1


def ratio(difference, bound):
    """max |difference| / bound over the elements (where bound is 0, the difference must be 0 too)."""
    difference = difference.abs()
    if torch.any((bound == 0) & (difference > 0)):
        return float("inf")
    return (difference / bound.clamp_min(torch.finfo(torch.float32).tiny)).max().item()


def main(out, with_stage=False):
    torch.set_num_threads(1)  # as torchrun sets for each rank: the same summation order everywhere
    ddp = nc.init_distributed()
    run_dir = Path(out) / f"rank{ddp.rank}"
    os.environ["NANOCHAT_BASE_DIR"] = str(run_dir)
    # the same arguments everywhere: 128 tokens per step are 4 micro-batches of 2 x 16 in one
    # process, or 2 micro-batches on each of 2 ranks
    args = nc.build_parser().parse_args(["--stage", "base", *TINY, "--model-tag", "t", "--total-batch-size", "128",
                                         "--num-iterations", "4", "--eval-every", "0", "--save-every", "2"])
    nc.finalize_args(args)  # the per-stage defaults (--matrix-lr), as main() fills them in
    torch.nn.parallel.DistributedDataParallel = CountingDDP  # train() builds its DDP wrapper from here
    torch.manual_seed(0)
    model = nc.GPT(nc.config_from_depth(2, VOCAB, 16, aspect_ratio=32, head_dim=16))
    model.init_weights()
    tokenizer = bpe.Tokenizer.train(["tiny text for a tokenizer id " * 20], 280, special_tokens=nc.SPECIAL_TOKENS)

    def make_batches(split, state=None):  # state: the last global micro-batch used
        return synthetic_batches(ddp, args.device_batch_size, args.max_seq_len, split, 0 if state is None else state + 1)

    def evaluate(model):  # validation batches 0..3 in all, whatever the number of ranks
        return dict(val_loss=nc.evaluate_loss(model, make_batches("val"), 4 // ddp.world_size))

    checks = []
    if ddp.is_ddp:  # check every step against one process (train() builds its optimizers with this)
        def checked_optimizers(model, *rates, **options):
            optimizers = setup_optimizers(model, *rates, **options)
            grad_accum = args.total_batch_size // (args.device_batch_size * args.max_seq_len * ddp.world_size)
            checks.append(StepCheck(model, optimizers, ddp, grad_accum,
                                    lambda g: synthetic_batch(g, args.device_batch_size, args.max_seq_len)))
            return optimizers

        nc.setup_optimizers = checked_optimizers
    summary = nc.train(args, ddp, "base", nc.Start(model), tokenizer, make_batches, evaluate, args.num_iterations)
    nc.setup_optimizers = setup_optimizers
    # the validation loss of these final weights over all 4 validation batches in one process: the
    # same 4 per-batch sums as the all-reduced one, added in another order (float64)
    one_process_val_loss = nc.evaluate_loss(model, synthetic_batches(nc.Dist(), args.device_batch_size,
                                                                     args.max_seq_len, "val"), 4)
    result = dict(state=model.state_dict(), summary=summary, one_process_val_loss=one_process_val_loss,
                  reduced_at=CountingDDP.last.reduced_at if ddp.is_ddp else None,
                  grad_ratios=checks[0].grad_ratios if checks else None,
                  weight_ratios=checks[0].weight_ratios if checks else None)
    if with_stage:
        # the whole base stage on TinyWorld text, as the CLI runs it: sharded documents, val
        # bits-per-byte all-reduced, samples, checkpoint and report (these two on rank 0 only)
        nc.tokenizer_path().parent.mkdir(parents=True)
        tokenizer.save(nc.tokenizer_path())
        stage_args = nc.build_parser().parse_args(["--stage", "base", *TINY, "--model-tag", "s", "--total-batch-size", "128",
                                                   "--num-iterations", "2", "--eval-every", "0", "--eval-batches", "2",
                                                   "--sample-prompts", "The"])
        nc.finalize_args(stage_args)
        result["stage_summary"] = nc.stage_base(stage_args, ddp)
    torch.save(result, run_dir / "result.pt")
    if ddp.is_ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], with_stage="--with-stage" in sys.argv[2:])
