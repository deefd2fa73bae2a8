"""Solutions to lesson 6's "Try it" (checked by lessons/exercises/l06_sft.py)."""


def sft_targets(ids, mask):
    return [ids[i + 1] if mask[i + 1] else -1 for i in range(len(ids) - 1)]


def padding_fraction(lengths, T):
    cropped = [min(n, T + 1) for n in lengths]
    targets_per_row = max(cropped) - 1
    real = sum(n - 1 for n in cropped)
    return 1 - real / (len(cropped) * targets_per_row)


def _targets_masked_by_input(ids, mask):  # the mask of the input token instead of the next one
    return [ids[i + 1] if mask[i] else -1 for i in range(len(ids) - 1)]


def _padding_without_crop(lengths, T):  # forgets that rows are cropped to T + 1 tokens
    return 1 - sum(n - 1 for n in lengths) / (len(lengths) * (max(lengths) - 1))


WRONG = dict(  # a plausible mistake per exercise: each must fail its check
    sft_targets=_targets_masked_by_input,
    padding_fraction=_padding_without_crop,
)
