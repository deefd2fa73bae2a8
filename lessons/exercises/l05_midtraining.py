"""Checks for lesson 5's "Try it": the standard error of an accuracy (the +- of nc.format_accuracy),
and how many standard errors apart two accuracies are (reading the before/after bars)."""
import math
import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: nanochat_one.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import nanochat_one as nc  # noqa: E402

from . import attempt, exercise  # noqa: E402

# (correct, total): none right, all right, a 20-item task, nc.accuracy_stats' docstring, ...
COUNTS = [(0, 20), (20, 20), (5, 20), (3, 4), (222, 400), (1, 3), (7, 30), (1, 1), (0, 1), (999, 1000)]


def close(a, b):
    """Equal up to rounding, float32 included (PyTorch's default): mistakes such as N - 1 for N
    differ by a few percent."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@exercise
def standard_error(fn):
    """fn(correct, total) must equal nc.accuracy_stats(correct, total)["stderr"] = sqrt(p(1-p)/N)."""
    for correct, total in COUNTS:
        got = float(attempt(fn, correct, total))
        expected = nc.accuracy_stats(correct, total)["stderr"]
        assert close(got, expected), (
            f"standard_error({correct}, {total}) returned {got:.6g}, expected {expected:.6g}: with p = "
            f"{correct}/{total} = {correct / total:.4g}, the standard error is sqrt(p * (1 - p) / N) "
            f"(N = {total}, not N - 1)")


# worked examples: (p1, n1, p2, n2, gap), gaps computed by hand from se = sqrt(p(1-p)/n)
GAPS = [
    (0.25, 20, 0.45, 20, 1.356127),  # a 20-point jump on 20 items: only 1.4 standard errors, noise
    (0.50, 400, 0.60, 400, 2.857143),  # 10 points on 400 items each: beyond noise
    (0.60, 400, 0.50, 400, -2.857143),  # the same, the other way round
    (0.30, 30, 0.30, 30, 0.0),  # no difference at all
    (0.0, 30, 0.1, 30, 1.825742),  # se of 0/30 is 0: all the noise comes from the second accuracy
]


@exercise
def gap_in_standard_errors(fn):
    """fn(p1, n1, p2, n2) = (p2 - p1) / sqrt(se1^2 + se2^2): worked examples, then an oracle built
    on nc.accuracy_stats for counts, and the scaling with N (4x the items: twice the gap)."""
    for p1, n1, p2, n2, gap in GAPS:
        got = float(attempt(fn, p1, n1, p2, n2))
        assert abs(got - gap) < 1e-5, (
            f"gap_in_standard_errors({p1}, {n1}, {p2}, {n2}) returned {got:.6f}, expected {gap:.6f}: "
            f"the standard error of a difference of two independent accuracies is sqrt(se1^2 + se2^2), "
            f"not se1 + se2")
    for (c1, n1), (c2, n2) in [((5, 20), (9, 20)), ((222, 400), (240, 400)), ((3, 4), (1, 3)), ((7, 30), (0, 20))]:
        a, b = nc.accuracy_stats(c1, n1), nc.accuracy_stats(c2, n2)
        expected = (b["accuracy"] - a["accuracy"]) / math.hypot(a["stderr"], b["stderr"])
        got = float(attempt(fn, c1 / n1, n1, c2 / n2, n2))
        assert math.isclose(got, expected, rel_tol=1e-6), (
            f"gap_in_standard_errors({c1}/{n1}, {n1}, {c2}/{n2}, {n2}) returned {got:.6f}, "
            f"expected {expected:.6f} from nc.accuracy_stats' standard errors")
    small, large = float(attempt(fn, 0.25, 20, 0.45, 20)), float(attempt(fn, 0.25, 80, 0.45, 80))
    assert math.isclose(large, 2 * small, rel_tol=1e-6), (
        f"4x the items should halve each standard error and so double the gap: got {small:.4f} on "
        f"20 items each and {large:.4f} on 80")
