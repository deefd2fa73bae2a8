"""Checks for lesson 6's "Try it": the SFT targets of one rendered conversation, and the share of
an SFT batch that is padding. Conversations are rendered with a byte-level tokenizer (no merges:
one token per byte, plus the special tokens), so no trained tokenizer is needed."""
import pathlib
import random
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py, bpe.py, tinyworld.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bpe  # noqa: E402
import nanochat_one as nc  # noqa: E402

from . import attempt, exercise  # noqa: E402


def byte_tokenizer():
    """A tokenizer with no merges: token i < 256 is byte i, then the chat's special tokens."""
    return bpe.Tokenizer([], special_tokens=nc.SPECIAL_TOKENS)


def sft_batch(tokenizer, B, T):
    """The first SFT batch of the TinyWorld training split (world size 1), as the lesson draws it,
    with the conversations it holds."""
    args = nc.build_parser().parse_args(["--stage", "sft"])
    nc.finalize_args(args)  # the stage's defaults, as main() fills them in
    x, y, _ = next(nc.sft_batches(args, tokenizer, "train", B, T, nc.Dist(), "cpu"))
    conversations = [c for _, c in zip(range(B), (c for _, c in nc.chat_examples(args, "train", 0, "sft")))]
    return x, y, conversations


@exercise
def sft_targets(fn):
    """fn(ids, mask) -> len(ids) - 1 targets, ids[i + 1] where mask[i + 1] else -1: a worked example,
    then the rows of nc.sft_batches (up to each conversation's end; the rest is padding)."""
    ids, mask = [10, 11, 12, 13, 14, 15, 16], [0, 0, 0, 1, 1, 0, 1]
    got = [int(t) for t in attempt(fn, ids, mask)]
    expected = [-1, -1, 13, 14, -1, 16]
    assert got == expected, (
        f"sft_targets({ids}, {mask}) returned {got}, expected {expected}: the target at position i is the "
        f"token at i + 1, trained when the mask of that next token (mask[i + 1]) is 1")
    tokenizer = byte_tokenizer()
    T = 256
    _, y, conversations = sft_batch(tokenizer, 6, T)
    for r, conversation in enumerate(conversations):
        ids, mask = nc.render_conversation(tokenizer, conversation, max_tokens=T + 1)  # cropped as the loader does
        got = [int(t) for t in attempt(fn, list(ids), list(mask))]
        expected = y[r, :len(ids) - 1].tolist()
        assert len(got) == len(expected), (
            f"conversation {r}: {len(ids)} tokens should give {len(expected)} targets (one per token "
            f"but the last, which has no next token), got {len(got)}")
        wrong = [i for i in range(len(got)) if got[i] != expected[i]]
        assert not wrong, (
            f"conversation {r} (of the first SFT batch): {len(wrong)} targets differ from nc.sft_batches', the "
            f"first at position {wrong[0]}: got {got[wrong[0]]}, expected {expected[wrong[0]]} (next token "
            f"{ids[wrong[0] + 1]}, mask {mask[wrong[0] + 1]})")


def padding_oracle(lengths, T):
    """Build the target grid as nc.sft_batches lays it out and count its padding cells."""
    cropped = [min(n, T + 1) for n in lengths]
    width = max(cropped)
    grid = [[i < n - 1 for i in range(width - 1)] for n in cropped]  # True: a target of the conversation
    return sum(not cell for row in grid for cell in row) / (len(grid) * (width - 1))


@exercise
def padding_fraction(fn):
    """fn(lengths, T): the share of the B x (W - 1) targets of an SFT batch that are padding, with
    W the longest length after cropping to T + 1: a worked example, the lesson's first batch (its
    width from nc.sft_batches), random batches against a grid built cell by cell."""
    got = float(attempt(fn, [5, 3, 9], 7))
    assert abs(got - 8 / 21) < 1e-6, (
        f"padding_fraction([5, 3, 9], T=7) returned {got:.6f}, expected 8/21 = {8 / 21:.6f}: cropped to T + 1 = 8 "
        f"tokens the rows are 5, 3, 8 long, so W = 8 and there are 3 x 7 = 21 targets, 4 + 2 + 7 = 13 of them real")
    got = float(attempt(fn, [40, 40, 40], 256))
    assert abs(got) < 1e-6, f"rows of equal length need no padding: padding_fraction([40, 40, 40], 256) returned {got}"
    tokenizer = byte_tokenizer()
    for B, T in [(8, 256), (8, 64)]:
        x, _, conversations = sft_batch(tokenizer, B, T)
        lengths = [len(nc.render_conversation(tokenizer, c)[0]) for c in conversations]  # before cropping
        real = sum(min(n, T + 1) - 1 for n in lengths)
        expected = 1 - real / x.numel()  # x: B x (W - 1), the loader's own width
        got = float(attempt(fn, lengths, T))
        assert abs(got - expected) < 1e-6, (
            f"padding_fraction({lengths}, T={T}) returned {got:.6f}, but nc.sft_batches' batch of these "
            f"conversations is {B} x {x.size(1)} targets, {real} of them real: {expected:.6f} padding")
    rng = random.Random(0)
    for _ in range(50):
        T = rng.choice([8, 16, 64])
        lengths = [rng.randint(2, 3 * T) for _ in range(rng.randint(1, 6))]
        got, expected = float(attempt(fn, lengths, T)), padding_oracle(lengths, T)
        assert abs(got - expected) < 1e-6, (
            f"padding_fraction({lengths}, T={T}) returned {got:.6f}, expected {expected:.6f}")
