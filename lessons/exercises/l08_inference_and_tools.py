"""Checks for lesson 8's "Try it": top-p (nucleus) filtering of logits, against a brute-force oracle,
and a calculator that also takes square roots, against sandbox.calculator's rules."""
import math
import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py, sandbox.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import nanochat_one as nc  # noqa: E402
import sandbox  # noqa: E402

from . import attempt, exercise  # noqa: E402


def top_p_oracle(row, p):
    """The kept token ids of one row of logits, by brute force in float64: sort by probability,
    add them up one by one and stop at the first prefix that reaches p (at least one token).
    Also the distance of the nearest prefix sum to p (how close the case is to a tie)."""
    probs = torch.softmax(row.double(), dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    total, kept, margin = 0.0, [], math.inf
    for i in order:
        kept.append(i)
        total += probs[i]
        margin = min(margin, abs(total - p))
        if total >= p:
            break
    return set(kept), margin


def check_top_p_row(fn, logits, p, where):
    before = logits.clone()
    result = attempt(fn, logits, p)
    assert torch.equal(logits, before), f"top_p_filter({where}, p={p}) changed its input logits: work on a copy"
    assert isinstance(result, torch.Tensor) and result.shape == logits.shape and result.dtype == logits.dtype, (
        f"top_p_filter({where}, p={p}) should return a {logits.dtype} tensor of shape {tuple(logits.shape)}, got "
        f"{type(result).__name__} {getattr(result, 'dtype', '')} {tuple(getattr(result, 'shape', ()))}")
    for r in range(logits.size(0)):
        expected, margin = top_p_oracle(logits[r], p)
        if margin < 1e-4:  # a prefix sum this close to p: float32 rounding may tip it either way (2 rows of 72 below)
            continue
        kept = set(torch.isfinite(result[r]).nonzero().flatten().tolist())
        assert kept == expected, (
            f"top_p_filter({where}, p={p}), row {r}: kept {len(kept)} tokens, expected the {len(expected)} most "
            f"likely (the smallest set whose probabilities sum to >= p); missing {sorted(expected - kept)[:5]}, "
            f"extra {sorted(kept - expected)[:5]}")
        outside = [i for i in range(logits.size(1)) if i not in kept]
        assert torch.equal(result[r, sorted(kept)], logits[r, sorted(kept)]), (
            f"top_p_filter({where}, p={p}), row {r}: the kept tokens must keep their logits unchanged "
            f"(sampling renormalises them)")
        assert bool((result[r, outside] == float("-inf")).all()), (
            f"top_p_filter({where}, p={p}), row {r}: every token outside the kept set must be -inf")


@exercise
def top_p_filter(fn):
    """fn(logits, p) for logits (B, vocab): -inf outside the smallest set of most likely tokens whose
    probabilities sum to >= p: a worked example, random logits at several temperatures and p against
    the brute-force oracle, p = 1 (all kept), tiny p (the argmax alone), and nc.sample_next on the result."""
    worked = torch.log(torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]]))  # sorted: 0.5, 0.3, 0.1, 0.05, 0.05
    for p, kept in [(0.4, {1}), (0.75, {1, 3}), (0.88, {0, 1, 3}), (1.0, {0, 1, 2, 3, 4})]:
        result = attempt(fn, worked, p)
        got = set(torch.isfinite(result[0]).nonzero().flatten().tolist())
        assert got == kept, (
            f"probabilities [0.1, 0.5, 0.05, 0.3, 0.05], p={p}: kept tokens {sorted(got)}, expected {sorted(kept)} "
            f"(add the probabilities from the largest down and stop as soon as the sum reaches p)")
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 5.0):
        logits = torch.randn(8, 50, generator=g) * scale
        for p in (0.3, 0.9, 0.95):
            check_top_p_row(fn, logits, p, f"randn(8, 50) * {scale}")
    logits = torch.randn(4, 50, generator=g)
    result = attempt(fn, logits, 1.0)
    assert torch.equal(result, logits), (
        "top_p_filter(logits, p=1.0) must keep every token unchanged: only the whole vocabulary sums to 1")
    for p in (1e-9, 0.0):
        result = attempt(fn, logits, p)
        kept = torch.isfinite(result)
        assert kept.sum(dim=1).tolist() == [1] * 4 and torch.equal(kept.float().argmax(dim=1), logits.argmax(dim=1)), (
            f"top_p_filter(logits, p={p}) must keep exactly one token per row, the most likely one")
    filtered = attempt(fn, logits, 0.5)
    draws = nc.sample_next(filtered.repeat(250, 1), torch.Generator().manual_seed(1))  # 1000 draws
    allowed = torch.isfinite(filtered.repeat(250, 1)).gather(1, draws[:, None])
    assert bool(allowed.all()), "nc.sample_next on the filtered logits drew a token that top_p_filter removed"


# expressions without sqrt: calculator_with_sqrt must answer exactly as sandbox.calculator does
PLAIN = ["12*7", "100/8", "7//2", "17%5", "-(3+4)*2", "2**10", "0.1+0.2", " 3 + 4 ", "2**0.5", "1/0", "2**100000",
         "10**40*10**40", "9" * 250, "1e400", "(-8)**(1/3)", "True+1", "__import__('os').system('ls')", "abs(-3)",
         "x+1", "'a'*3", "3 apples", ""]
WITH_SQRT = [  # (expression, the result text; None: refused)
    ("sqrt(16)", "4"), ("sqrt(2)", "1.414214"), ("2*sqrt(9)+1", "7"), ("sqrt(sqrt(16))", "2"), ("sqrt(16)/8", "0.5"),
    ("(1+sqrt(5))/2", "1.618034"), ("sqrt(3**2+4**2)", "5"), ("sqrt(0.25)", "0.5"), ("-sqrt(49)", "-7"),
    ("sqrt(-1)", None), ("sqrt(2-3)", None), ("sqrt(1, 2)", None), ("sqrt()", None), ("sqrt", None),
    ("sqrt(x)", None), ("math.sqrt(4)", None), ("sqrt(4)(2)", None), ("sqrt(x=4)", None), ("sqrt(1/0)", None),
    ("sqrt(2**100000)", None), ("sqrt(10**61)", None), ("sqrt(16)**100", None), ("sqrt(abs(-4))", None),
    ("abs(sqrt(4))", None), ("sqrt('16')", None), ("SQRT(16)", None), ("sqrt(__import__('os').getpid())", None),
]


def check_answer(got, expression):
    assert isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], bool) and isinstance(got[1], str), (
        f"calculator_with_sqrt({expression!r}) returned {got!r}: it must return (ok, text) like the calculator")
    return got


@exercise
def calculator_with_sqrt(fn):
    """fn(expression) -> (ok, text): identical to sandbox.calculator on expressions without sqrt
    (results, and which ones are refused), and sqrt(x) allowed wherever a number may stand."""
    for expression in PLAIN:
        ok, text = check_answer(attempt(fn, expression), expression)
        expected_ok, expected_text = sandbox.calculator(expression)
        shown = expression if len(expression) < 40 else expression[:12] + f"... ({len(expression)} characters)"
        if expected_ok:
            assert (ok, text) == (True, expected_text), (
                f"calculator_with_sqrt({shown!r}) returned {(ok, text)!r}, but the calculator answers "
                f"{expected_text!r}")
        else:
            assert not ok, (
                f"calculator_with_sqrt({shown!r}) returned {(ok, text[:40])!r}, but the calculator refuses it "
                f"({expected_text}): the new tool must keep every rule of the old one")
    for expression, expected in WITH_SQRT:
        ok, text = check_answer(attempt(fn, expression), expression)
        if expected is None:
            assert not ok, f"calculator_with_sqrt({expression!r}) returned {(ok, text)!r}: it must be refused"
        else:
            assert (ok, text) == (True, expected), (
                f"calculator_with_sqrt({expression!r}) returned {(ok, text)!r}, expected (True, {expected!r}) "
                f"(results are formatted as the calculator formats them: whole numbers without '.0', "
                f"others rounded to 6 decimals)")
