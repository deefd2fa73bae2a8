"""Solutions to lesson 5's "Try it" (checked by lessons/exercises/l05_midtraining.py)."""
import math


def standard_error(correct, total):
    p = correct / total
    return math.sqrt(p * (1 - p) / total)


def gap_in_standard_errors(p1, n1, p2, n2):
    se1, se2 = math.sqrt(p1 * (1 - p1) / n1), math.sqrt(p2 * (1 - p2) / n2)
    return (p2 - p1) / math.sqrt(se1 ** 2 + se2 ** 2)


def _standard_error_of_a_sample(correct, total):  # divides by N - 1, not N
    p = correct / total
    return math.sqrt(p * (1 - p) / max(total - 1, 1))


def _gap_adding_standard_errors(p1, n1, p2, n2):  # se1 + se2 instead of sqrt(se1^2 + se2^2)
    return (p2 - p1) / (math.sqrt(p1 * (1 - p1) / n1) + math.sqrt(p2 * (1 - p2) / n2))


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    standard_error=_standard_error_of_a_sample,
    gap_in_standard_errors=_gap_adding_standard_errors,
)
