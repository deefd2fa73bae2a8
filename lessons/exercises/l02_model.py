"""Checks for lesson 2's "Try it": the number of parameters of a GPTConfig by formula, checked against
the model nc.GPT builds, and rotary embeddings computed from scratch, checked against nc.apply_rotary
with the model's own tables."""
import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402

from . import attempt, exercise  # noqa: E402

CONFIGS = [
    nc.GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64),  # the lesson's
    nc.GPTConfig(sequence_len=32, vocab_size=100, n_layer=3, n_head=3, n_kv_head=3, n_embd=48),  # no grouping
    nc.GPTConfig(sequence_len=32, vocab_size=100, n_layer=3, n_head=3, n_kv_head=1, n_embd=48),  # one k/v head
    nc.config_from_depth(20, vocab_size=65536, sequence_len=2048),  # nanochat's d20
]


@exercise
def count_parameters(fn):
    """fn(config) must equal the number of parameters of nc.GPT(config), built on the meta device."""
    for config in CONFIGS:
        got = attempt(fn, config)
        with torch.device("meta"):  # shapes only, no memory
            model = nc.GPT(config)
        expected = sum(p.numel() for p in model.parameters())
        if got == expected:
            continue
        block = sum(p.numel() for p in model.transformer.h[0].parameters())
        wte = model.transformer.wte.weight.numel()
        raise AssertionError(
            f"count_parameters({config}) returned {got:,}; nc.GPT has {expected:,}: wte {wte:,} (also the "
            f"head: tied) + {config.n_layer} blocks of {block:,}. A block holds c_q, c_k, c_v, c_proj, one "
            f"smear weight per key head and the MLP's c_fc, c_proj; c_k and c_v have n_kv_head * head_dim "
            f"rows, and nothing has a bias")


def model_tables(T, D):
    """cos and sin of the rotation angles, (1, 1, T, D/2), as the model computes them for head dimension D."""
    model = nc.GPT(nc.GPTConfig(sequence_len=T, vocab_size=1, n_layer=1, n_head=1, n_kv_head=1, n_embd=D))
    return model.cos[:, :, :T], model.sin[:, :, :T]


@exercise
def rope(fn):
    """fn(x) for x of shape (B, H, T, D) must equal nc.apply_rotary(x, cos, sin) with the model's tables."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 32, 16), (1, 2, 20, 8)]:
        x = torch.randn(shape, generator=generator)
        got = attempt(fn, x.clone())
        assert tuple(got.shape) == shape, f"rope returned shape {tuple(got.shape)} for x of shape {shape}"
        expected = nc.apply_rotary(x, *model_tables(shape[2], shape[3]))
        # Your angles t * base^(-2i/D) may round differently from the model's float32 ones: below 32 rad,
        # where a float32 ulp is 4e-6, a few ulps apart is at most ~1e-5 rad; times |x1| + |x2| < 10 that
        # moves an output by < 1e-4. A wrong pairing or angle moves it by ~1.
        error = (got.float() - expected).abs()
        if error.max() < 2e-4:
            continue
        t, i = divmod(int(error.amax(dim=(0, 1)).argmax()), shape[3])
        first = (got[:, :, 0] - x[:, :, 0]).abs().max()
        hint = ("position 0 is not x itself, but its angle is 0, so nothing should move there"
                if first > 1e-6 else "position 0 is right (no rotation); check the angle t * base^(-2i/D) of "
                "pair i at position t, and that x[..., i] pairs with x[..., i + D/2], the other half")
        raise AssertionError(f"for x of shape {shape}, rope(x) differs from nc.apply_rotary by up to "
                             f"{error.max():.3g}, worst at position t = {t}, element {i}. Hint: {hint}")
