"""Checks for lesson 1's "Try it": decode token ids knowing only the merges, and encode text by
applying the merges in the order they were learned. The oracle is bpe.Tokenizer itself, trained here
on TinyWorld text."""
import functools
import itertools
import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # the repository root: bpe.py, tinyworld.py
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bpe  # noqa: E402
import tinyworld  # noqa: E402

from . import attempt, exercise  # noqa: E402

# short texts that each test one thing, then real validation documents
EDGE_CASES = [
    "the cat",
    "The capital of France is Paris.",
    "In 2024, 12345 apples cost 67 coins.",  # numbers split into runs of at most 2 digits
    "It's what they'll do, isn't it?",  # contractions are chunks of their own
    "  two  spaces,\n\nnew lines\tand a tab  ",
    "Zoë's café ☕ costs 5 €.",  # characters of 2 and 3 bytes, never merged by a TinyWorld BPE
]


@functools.lru_cache(maxsize=None)
def tokenizer():
    """A BPE of 512 tokens (256 merges, no special tokens) trained on 100 TinyWorld training documents."""
    texts = [text for _, text in itertools.islice(tinyworld.tinyworld_documents("train"), 100)]
    return bpe.Tokenizer.train(texts, vocab_size=512)


@functools.lru_cache(maxsize=None)
def texts():
    return EDGE_CASES + [text for _, text in itertools.islice(tinyworld.tinyworld_documents("val"), 3)]


def show(text, width=60):
    return repr(text if len(text) <= width else text[:width] + "...")


@exercise
def decode(fn):
    """fn(ids, merges) must give back the text that bpe.Tokenizer encoded into ids."""
    tok = tokenizer()
    for text in texts():
        got = attempt(fn, tok.encode(text), list(tok.merges))
        assert isinstance(got, str), f"decode returned a {type(got).__name__}, expected a str"
        if got == text:
            continue
        i = next((i for i, (a, b) in enumerate(zip(got, text)) if a != b), min(len(got), len(text)))
        hint = ("\ufffd (the replacement character) appears: a character of several bytes may be split over "
                "tokens, so join the bytes of all the tokens first, then decode them once"
                if "\ufffd" in got else "merge k made token 256 + k from the two tokens merges[k] = (a, b)")
        raise AssertionError(f"decoding the ids of {show(text)} gave {show(got)}; the first difference is "
                             f"at character {i}: {got[i:i + 12]!r} instead of {text[i:i + 12]!r}. Hint: {hint}")


@exercise
def encode(fn):
    """fn(text, merges) must equal bpe.Tokenizer's ids, token for token."""
    tok = tokenizer()
    for text in texts():
        got = attempt(fn, text, list(tok.merges))
        expected = tok.encode(text)
        if list(got) == expected:
            continue
        got = list(got)
        i = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        pieces = lambda ids: [tok.decode([t]) if 0 <= t < 512 else t for t in ids]  # noqa: E731
        if all(isinstance(t, int) and 0 <= t < 512 for t in got) and tok.decode(got) == text:
            hint = ("your ids spell the same text, so the merges were applied in another order: in each chunk, "
                    "always merge the pair whose merge was learned first (the smallest id), and never across chunks")
        else:
            hint = "your ids do not spell the text: start from the UTF-8 bytes of each chunk"
        raise AssertionError(f"encoding {show(text)}: your {len(got)} ids and bpe's {len(expected)} first differ at "
                             f"token {i}: yours {pieces(got[i:i + 4])}, bpe's {pieces(expected[i:i + 4])}. "
                             f"Hint: {hint}")
