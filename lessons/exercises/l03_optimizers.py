"""Checks for lesson 3's "Try it": a few steps of AdamW written by hand, checked against
torch.optim.AdamW, and a few steps of Muon written by hand, checked against nc.Muon. Each check takes
one step, then two, ..., and reports the first number of steps after which the weights differ."""
import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402

from . import attempt, exercise  # noqa: E402

# The weights are N(0, 1), so |w| < 5 and a float32 rounding of a weight moves it by at most 2.4e-7
# (half an ulp at 4). Another order of the same operations rounds a few more times per step: a few
# 1e-6 after 5 steps. A wrong formula moves the weights by about lr * 0.1 or more, >= 1e-3 here.
ATOL = 1e-5


def compare(name, fn, weight, grads, oracle, hyper, hint):
    """Call fn(weight, grads[:s], **hyper) for s = 1, 2, ... and compare each with oracle's weights."""
    for s in range(1, len(grads) + 1):
        got = attempt(fn, weight.clone(), [g.clone() for g in grads[:s]], **hyper)
        expected = oracle(weight, grads[:s], **hyper)
        assert tuple(got.shape) == tuple(weight.shape), (
            f"{name} returned shape {tuple(got.shape)} for a weight of shape {tuple(weight.shape)}")
        error = (got.float() - expected).abs().max().item()
        assert error < ATOL, (f"{name}: with a {tuple(weight.shape)} weight and {hyper}, the weights after "
                              f"{s} step{'s' * (s > 1)} differ from the oracle's by up to {error:.3g}. "
                              f"Hint: {hint(s)}")


def oracle_steps(make_optimizer, weight, grads):
    """The weights after a real optimizer (make_optimizer([parameter])) takes one step per gradient."""
    p = torch.nn.Parameter(weight.clone())
    opt = make_optimizer([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def torch_adamw(weight, grads, lr, betas, eps, weight_decay):
    return oracle_steps(lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                                         foreach=False), weight, grads)


def adamw_hint(steps):
    if steps == 1:
        return ("already the first step differs: check the bias corrections, m / (1 - beta1^t) and "
                "v / (1 - beta2^t) with t = 1, 2, ..., and the weight decay: AdamW shrinks the weights by "
                "(1 - lr * weight_decay) apart from the gradient, never adding weight_decay * w to it")
    return (f"step 1 is right but step {steps} is not: m and v must carry over from step to step, "
            f"and t count the steps taken")


@exercise
def adamw(fn):
    """fn(weight, grads, lr, betas, eps, weight_decay) must equal torch.optim.AdamW's weights."""
    generator = torch.Generator().manual_seed(0)
    cases = [  # nanochat's betas and eps with a large weight decay; PyTorch's defaults, gradients of mixed sizes
        ((16, 8), 3, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.2)),
        ((32,), 5, dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)),
    ]
    for shape, steps, hyper in cases:
        weight = torch.randn(shape, generator=generator)
        grads = [torch.randn(shape, generator=generator) * 10.0 ** (k % 3 - 1) for k in range(steps)]
        compare("adamw", fn, weight, grads, torch_adamw, hyper, adamw_hint)


def nc_muon(weight, grads, lr, momentum):
    return oracle_steps(lambda params: nc.Muon(params, lr=lr, momentum=momentum), weight, grads)


def muon_hint(steps):
    if steps == 1:
        return ("already the first step differs: orthogonalise the update with nc.newton_schulz_orthogonalize, "
                "and scale the step by lr * sqrt(max(1, rows / cols))")
    return (f"step 1 is right but step {steps} is not: keep the momentum buffer from step to step, "
            f"buf = momentum * buf + (1 - momentum) * grad, and orthogonalise Nesterov's look-ahead "
            f"(1 - momentum) * grad + momentum * buf, not buf itself")


@exercise
def muon(fn):
    """fn(weight, grads, lr, momentum) must equal nc.Muon's weights, for a wide and a tall matrix."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(32, 64), (128, 32)]:
        weight = torch.randn(shape, generator=generator)
        grads = [torch.randn(shape, generator=generator) for _ in range(3)]
        compare("muon", fn, weight, grads, nc_muon, dict(lr=0.02, momentum=0.95), muon_hint)
