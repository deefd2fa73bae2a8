"""Checks for lesson 7's "Try it": GRPO's original advantage normalisation (which nanochat_one leaves
out), and the unbiased pass@k estimator, against brute-force enumeration."""
import itertools
import math
import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402

from . import attempt, exercise  # noqa: E402

GROUPS = [
    [1.0, 0.0, 0.0, 1.0],  # by hand: mean 0.5, std 0.5, so +-0.5 / (0.5 + 1e-6) = +-0.999998
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # one lucky sample in 8
    [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    [0.2, 0.5, 0.9],  # rewards need not be 0/1
    [3.0, -1.0, 2.5, 0.0, 7.25],
    [0.0, 0.0, 0.0, 0.0],  # all equal: no signal
    [1.0, 1.0, 1.0],
    [0.4],
]


def as_floats(result, n, call):
    values = [float(a) for a in result]
    assert len(values) == n, f"{call} returned {len(values)} advantages for {n} rewards"
    return values


@exercise
def normalized_advantages(fn):
    """fn(rewards) = (r - mean) / (std + 1e-6), population std: a hand-computed group, PyTorch
    (torch.std(correction=0)), and nc.grpo_sequences' advantages r - mean divided by std + 1e-6."""
    call = "normalized_advantages([1.0, 0.0, 0.0, 1.0])"
    got = as_floats(attempt(fn, [1.0, 0.0, 0.0, 1.0]), 4, call)
    expected = [0.5 / (0.5 + 1e-6) * s for s in (1, -1, -1, 1)]
    assert all(abs(g - e) < 1e-6 for g, e in zip(got, expected)), (
        f"{call} returned {[round(g, 6) for g in got]}, expected {[round(e, 6) for e in expected]}: mean 0.5, "
        f"population std 0.5 (divide by G = 4, not G - 1 = 3)")
    for rewards in GROUPS:
        call = f"normalized_advantages({rewards})"
        got = as_floats(attempt(fn, list(rewards)), len(rewards), call)
        r = torch.tensor(rewards, dtype=torch.float64)
        expected = ((r - r.mean()) / (r.std(correction=0) + 1e-6)).tolist()
        # float32 arithmetic is fine: |advantage| < sqrt(G), so errors stay far below 1e-5
        assert all(abs(g - e) < 1e-5 for g, e in zip(got, expected)), (
            f"{call} returned {[round(g, 6) for g in got]}, expected {[round(e, 6) for e in expected]} "
            f"(PyTorch: (r - r.mean()) / (r.std(correction=0) + 1e-6))")
        if all(x == rewards[0] for x in rewards):
            assert all(g == 0 for g in got), (
                f"{call}: a group whose rewards are all equal has advantage 0 everywhere, got {got}")
            continue
        # nanochat_one's advantage is r - mean (nc.grpo_sequences)
        rows = nc.grpo_sequences([0], [[1]] * len(rewards), [[1]] * len(rewards), rewards)
        std = r.std(correction=0).item()
        for g, row in zip(got, rows):
            assert abs(g * (std + 1e-6) - row.advantage) < 1e-5, (
                f"{call}: times (std + 1e-6) = {std + 1e-6:.6f} the advantages should be nc.grpo_sequences' "
                f"r - mean, {[round(row.advantage, 6) for row in rows]}")


def brute_force_pass_at_k(n, c, k):
    """The fraction of all k-subsets of n samples (the first c correct) with a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


CASES = [(5, 0, 1), (5, 5, 3), (10, 3, 1), (10, 3, 2), (10, 3, 5), (8, 1, 8), (6, 2, 4), (12, 4, 3), (10, 7, 4),
         (12, 1, 6), (16, 2, 4), (7, 3, 7), (9, 4, 1)]


@exercise
def pass_at_k_unbiased(fn):
    """fn(n, c, k) = 1 - C(n - c, k) / C(n, k): against enumerating every k-subset of n samples with c
    correct, for several (n, c, k), then the two cases the lesson's own numbers are: k = 1 is c / n
    (pass@1, a mean fraction correct), and k = n is whether any sample was right (nc.pass_at_k's pass@k)."""
    for n, c, k in CASES:
        got = float(attempt(fn, n, c, k))
        expected = brute_force_pass_at_k(n, c, k)
        assert abs(got - expected) < 1e-6, (
            f"pass_at_k_unbiased(n={n}, c={c}, k={k}) returned {got:.6f}, but of the {math.comb(n, k)} ways to "
            f"pick {k} of the {n} samples, a fraction {expected:.6f} contains a correct one "
            f"(1 - C({n - c}, {k}) / C({n}, {k}))")
    for n, c in [(6, 0), (6, 1), (6, 4), (20, 7)]:
        got1, gotn = float(attempt(fn, n, c, 1)), float(attempt(fn, n, c, n))
        assert abs(got1 - c / n) < 1e-6, (
            f"pass@1 is the fraction correct: pass_at_k_unbiased({n}, {c}, 1) returned {got1}, expected {c}/{n}")
        assert abs(gotn - (c > 0)) < 1e-6, (
            f"with k = n every sample is drawn: pass_at_k_unbiased({n}, {c}, {n}) returned {gotn}, "
            f"expected {float(c > 0)}")
