"""Solutions to lesson 7's "Try it" (checked by lessons/exercises/l07_rl_grpo.py)."""
import math


def normalized_advantages(rewards):
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))  # population std: divide by G
    return [(r - mean) / (std + 1e-6) for r in rewards]


def pass_at_k_unbiased(n, c, k):
    return 1 - math.comb(n - c, k) / math.comb(n, k)  # comb(n - c, k) is 0 when k > n - c


def _advantages_sample_std(rewards):  # divides by G - 1 (torch.std's default), not G
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(len(rewards) - 1, 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    normalized_advantages=_advantages_sample_std,
    pass_at_k_unbiased=lambda n, c, k: 1 - (1 - c / n) ** k,  # sampling with replacement: biased
)
