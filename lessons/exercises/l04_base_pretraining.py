"""Lesson 4's exercises: fill one row by best-fit packing, and accumulate gradients over micro-steps.

The oracles are nanochat_one's own packer (nc.pack_rows, fed stand-in documents) and PyTorch's
gradient of the whole batch in one backward pass.
"""
import itertools
import pathlib
import random
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402

from . import attempt, exercise  # noqa: E402


def packed_row(lengths, T):
    """The first row nc.pack_rows makes from a buffer holding exactly these documents, as a list of
    (document index, tokens taken). Document k is the token k repeated lengths[k] times. pack_rows
    refills its buffer after every document it takes; the refills here are T + 2 tokens long, so
    after a row's first document they never fit and are never the shortest while a real document
    waits, and with lengths adding up to at least T + 1 one waits until the row is full."""
    def docs_from(start):
        for k in itertools.count(start):
            yield k, [k] * (lengths[k] if k < len(lengths) else T + 2)
    (row,), _ = next(nc.pack_rows(docs_from, 1, T, buffer_size=len(lengths)))
    return [(k, len(list(run))) for k, run in itertools.groupby(row)]


@exercise
def best_fit_row(fn):
    """fn(lengths, T): fill one row of T + 1 tokens from documents of these lengths, best-fit, as
    nc.pack_rows does; return [(document index, tokens taken), ...] in the row's order."""
    cases = [([4, 7, 2, 5, 3], 9),  # 7 first, then 3 fills the 3 tokens left: [(1, 7), (4, 3)]
             ([6, 5, 5], 7),  # 6, then nothing fits in 2: the shortest (the first 5, on a tie) is cropped
             ([300, 20, 40], 255)]  # a document longer than the row fills it alone, cropped
    rng = random.Random(0)
    while len(cases) < 40:
        T = rng.choice([15, 31, 63])
        lengths = [rng.randint(1, T + 1) for _ in range(rng.randint(2, 12))]
        if sum(lengths) >= T + 1:
            cases.append((lengths, T))
    for lengths, T in cases:
        got = [tuple(pair) for pair in attempt(fn, list(lengths), T)]
        expected = packed_row(lengths, T)
        assert got == expected, (f"lengths {lengths}, T + 1 = {T + 1}: expected {expected} (what nc.pack_rows "
                                 f"puts in the row), got {got}")


def tiny_model():
    """A 2-block GPT (width 32, vocab 64) moved away from its init: at init the zero output layers
    give most matrices a zero gradient, which would hide a wrong one."""
    torch.manual_seed(0)
    model = nc.GPT(nc.GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@exercise
def accumulate_gradients(fn):
    """fn(model, x, y, micro_steps): run the batch (x, y) through the model micro_steps slices of
    rows at a time, leave in every parameter's .grad the gradient of the mean loss over the whole
    batch, and return that mean loss."""
    model = tiny_model()
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))  # (B, T)
    full_loss = model(x, y)
    full_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for micro_steps in (2, 4):
        model.zero_grad(set_to_none=True)
        rows_seen = []
        hook = model.register_forward_pre_hook(
            lambda module, args, kwargs: rows_seen.append((args[0] if args else kwargs["idx"]).size(0)), with_kwargs=True)
        try:
            loss = attempt(fn, model, x, y, micro_steps)
        finally:
            hook.remove()
        assert rows_seen == [8 // micro_steps] * micro_steps, (
            f"micro_steps={micro_steps}: the model should see {micro_steps} micro-batches of {8 // micro_steps} rows, "
            f"it saw batches of {rows_seen} rows")
        # Accumulating adds the same float32 terms as one backward pass, in another order: rounding
        # moves a sum of n terms by about n * 6e-8 of its size (here n <= 128 tokens, <= 1e-5).
        # 1e-4 of the largest entry leaves room; a gradient off by a factor 2 or 4 is far outside.
        for name, p in model.named_parameters():
            assert p.grad is not None, f"micro_steps={micro_steps}: {name} has no gradient (.grad is None)"
            error = (p.grad - expected[name]).abs().max().item()
            size = expected[name].abs().max().item()
            assert error <= 1e-4 * size, (
                f"micro_steps={micro_steps}: {name}.grad is off by up to {error:.3g} (its largest entry is {size:.3g}); "
                f"the sum of the micro-steps' gradients should be the gradient of the mean over all rows")
        assert abs(float(loss) - full_loss.item()) <= 1e-5 * full_loss.item(), (
            f"micro_steps={micro_steps}: returned loss {float(loss):.6f}, the mean loss over the batch is {full_loss.item():.6f}")
