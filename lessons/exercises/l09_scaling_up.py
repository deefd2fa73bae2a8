"""Checks for lesson 9's "Try it": the training FLOPs per token of a model sized by the depth dial,
counted from the shapes and checked against nc.GPT(...).estimate_flops() on the meta device, and the
number of gradient-accumulation micro-steps, checked against nc.grad_accum_steps, refusals included."""
import math
import operator
import pathlib
import sys
import types

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402

from . import NotAttempted, attempt, exercise  # noqa: E402

# (depth, vocab_size, seq_len, aspect_ratio, head_dim)
SHAPES = [
    (20, 65536, 2048, 64, 128),  # the speedrun's d20
    (12, 32768, 2048, 64, 128),  # the MFU example's smaller vocabulary
    (4, 4096, 256, 32, 32),  # the lessons' own model: width 128, 4 heads
    (3, 65536, 2048, 64, 128),  # 3 x 64 = 192 is not whole heads of 128: the width rounds up to 256
    (5, 1000, 256, 48, 64),  # 240 rounds up to 256, 4 heads
    (7, 4096, 512, 40, 32),  # 280 rounds up to 288, 9 heads
    (1, 100, 16, 64, 128),  # one block, one head of 128
]


def reference_flops(depth, vocab_size, seq_len, aspect_ratio, head_dim):
    """nc.GPT's own estimate, for the model nc.config_from_depth sizes (built on the meta device:
    shapes only, no memory, milliseconds even at depth 20)."""
    with torch.device("meta"):
        model = nc.GPT(nc.config_from_depth(depth, vocab_size, seq_len, aspect_ratio=aspect_ratio, head_dim=head_dim))
    return model, model.estimate_flops()


@exercise
def flops_per_token(fn):
    """fn(depth, vocab_size, seq_len, aspect_ratio, head_dim) must equal estimate_flops() of the
    model config_from_depth sizes: 6 x matmul parameters + 12 x layers x heads x head_dim x T."""
    for depth, vocab_size, seq_len, aspect_ratio, head_dim in SHAPES:
        got = float(attempt(fn, depth, vocab_size, seq_len, aspect_ratio=aspect_ratio, head_dim=head_dim))
        model, expected = reference_flops(depth, vocab_size, seq_len, aspect_ratio, head_dim)
        c = model.config
        call = f"flops_per_token({depth}, {vocab_size}, {seq_len}, aspect_ratio={aspect_ratio}, head_dim={head_dim})"
        # exact: every term is an integer far below 2^53, so even float arithmetic loses nothing, and
        # the smallest mistake (one matrix row) moves the answer by far more than 1e-12 of it
        if math.isclose(got, expected, rel_tol=1e-12):
            continue
        hints = []
        if math.isclose(got, expected + 6 * vocab_size * c.n_embd, rel_tol=1e-12):
            hints.append("that is 6 FLOPs too many for each of the vocab x width wte parameters: wte is both "
                         "the embedding and the head (tied); as the head it is a matmul, as the embedding a "
                         "lookup that costs nothing")
        if math.isclose(got, expected - 12 * c.n_layer * c.n_embd * seq_len, rel_tol=1e-12):
            hints.append("the attention term 12 x layers x heads x head_dim x T is missing")
        if depth * aspect_ratio != c.n_embd:
            hints.append(f"here depth x aspect_ratio = {depth * aspect_ratio} is not a whole number of heads of "
                         f"{head_dim}: the width rounds up to {c.n_embd} ({c.n_head} heads)")
        raise AssertionError(
            f"{call} returned {got:.6g}, expected {expected:.6g} (= nc.GPT(...).estimate_flops() at width "
            f"{c.n_embd}, {c.n_head} heads, {sum(p.numel() for p in model.parameters()):,} parameters)"
            + "".join(f"; {hint}" for hint in hints))


# (total_batch, device_batch, seq_len, world_size)
SPLITS = [
    (8192, 16, 256, 1),  # the lessons: 2 micro-steps of 16 rows of 256 tokens
    (524288, 16, 2048, 8),  # the speedrun's d20 on one 8-GPU node: 2 micro-steps per rank
    (524288, 16, 2048, 1),  # the same batch on one GPU: 8 times the micro-steps
    (524288, 32, 2048, 8),  # twice the device batch: no accumulation at all
    (524288, 4, 2048, 2),
    (96, 3, 4, 8),  # 96 = 3 x 4 x 8: one micro-step
]
REFUSED = [
    (524288, 16, 2048, 3),  # 3 ranks cannot share 2^19 tokens in whole micro-steps
    (524288, 24, 2048, 8),  # 393,216 tokens per micro-step does not divide 524,288
    (65536, 32, 2048, 8),  # less than one micro-step: 65,536 of 524,288 tokens
    (8192, 16, 200, 1),  # a context of 200 does not divide 8,192
]


def reference_steps(total_batch, device_batch, seq_len, world_size):
    """nc.grad_accum_steps with its flags in a namespace: the micro-steps, or nc.UserError."""
    args = types.SimpleNamespace(total_batch_size=total_batch, device_batch_size=device_batch, max_seq_len=seq_len)
    return nc.grad_accum_steps(args, world_size)


@exercise
def grad_accum(fn):
    """fn(total_batch, device_batch, seq_len, world_size) must return nc.grad_accum_steps' number of
    micro-steps per optimizer step, an int, and raise a ValueError where nc.grad_accum_steps refuses."""
    for split in SPLITS:
        got = attempt(fn, *split)
        expected = reference_steps(*split)
        total_batch, device_batch, seq_len, world_size = split
        assert got == expected, (
            f"grad_accum{split} returned {got!r}, expected {expected}: each micro-step of each of the "
            f"{world_size} process(es) reads {device_batch} x {seq_len} tokens, {device_batch * seq_len * world_size:,} "
            f"tokens per micro-step in all, and {total_batch:,} / {device_batch * seq_len * world_size:,} = {expected}"
            + (": divide by the number of processes too, they all read at once" if world_size > 1
               and got == total_batch // (device_batch * seq_len) else ""))
        try:
            operator.index(got)
        except TypeError:
            raise AssertionError(f"grad_accum{split} returned {got!r}, a {type(got).__name__}: a number of "
                                 f"micro-steps is an int (use //, after checking that it divides)") from None
    for split in REFUSED:
        total_batch, device_batch, seq_len, world_size = split
        try:
            reference_steps(*split)
            raise RuntimeError(f"nc.grad_accum_steps accepts {split}: not a refused case")
        except nc.UserError:
            pass
        try:
            got = fn(*split)
        except ValueError:
            continue
        except NotImplementedError:
            raise NotAttempted from None
        except Exception as e:
            raise AssertionError(f"grad_accum{split} raised {type(e).__name__}: {e}; expected a ValueError") from None
        per_micro_step = device_batch * seq_len * world_size
        raise AssertionError(
            f"grad_accum{split} returned {got!r}, expected a ValueError: {total_batch:,} tokens is not a whole "
            f"number of micro-steps of {device_batch} x {seq_len} x {world_size} = {per_micro_step:,} tokens "
            f"({total_batch / per_micro_step:.4g}), so the run would train on another batch size than asked; "
            f"nc.grad_accum_steps refuses it")
