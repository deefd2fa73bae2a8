"""
Byte-level BPE tokenizer, written as a readable specification in plain Python.

The algorithm in four lines:
  1. Pre-split text into chunks with a regex (words, numbers of 1-2 digits, punctuation,
     whitespace), so merges never cross a chunk boundary.
  2. Start from the 256 single bytes; every chunk is a list of byte ids.
  3. Repeatedly find the most frequent adjacent pair of ids over all chunks and replace it
     by a new id (a "merge"), until the vocabulary is big enough.
  4. Special tokens (<|bos|>, ...) get the ids after the merges.

Ties between equally frequent pairs are broken by one rule, the same in every backend:
the pair (a, b) with the smallest a, then the smallest b, wins.

Usage:
    tok = Tokenizer.train(texts, vocab_size=4096, special_tokens=["<|bos|>"])
    ids = tok.encode("hello world")            # special strings in the text stay ordinary text
    ids = tok.encode("<|bos|>hi", allowed_special={"<|bos|>"})
    tok.decode(ids) == "hello world"
    tok.save("tok.json"); tok = Tokenizer.load("tok.json")

An optional C extension (`_bpe`, csrc/_bpe.c) implements the hot loops with identical
results: training, encoding, and the pre-split itself when the pattern is SPLIT_PATTERN (a
hand-written matcher, since the regex module alone takes longer than everything else; other
patterns and texts with lone surrogates still go through the regex module). `BACKEND` says
which one is active, BPE_PURE_PYTHON=1 forces this file's Python code, set_backend() switches.
"""

import heapq
import json
import os
from collections import Counter

import regex

# GPT-4's split pattern, except that numbers split into runs of at most 2 digits (GPT-4: 3),
# which keeps the vocabulary from filling up with numbers on small corpora.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
FILE_FORMAT = "nanochat-one-bpe-v1"

# The encoder remembers the ids of the chunks it has seen (common words recur), within the C
# encoder's bounds, so that distinct requests cannot grow it without end: chunks longer than
# CACHE_MAX_CHUNK bytes are not kept (they seldom recur), and it stops growing at
# CACHE_MAX_ENTRIES chunks or CACHE_MAX_BYTES of chunks or of ids (4 bytes each, as C stores them).
CACHE_MAX_ENTRIES = 1 << 20
CACHE_MAX_BYTES = 64 << 20
CACHE_MAX_CHUNK = 256

# ---------------------------------------------------------------------------------------------
# Backend selection: the C extension if it was built and not disabled, else pure Python.

_c = None
if os.environ.get("BPE_PURE_PYTHON", "") not in ("1", "true", "yes"):
    try:
        import _bpe as _c
    except ImportError:
        _c = None
BACKEND = "c" if _c is not None else "python"


def set_backend(name):
    """Switch to "c" or "python" for tokenizers made (and trained) from now on; both give the
    same merges and ids, so this is for tests and benchmarks. ImportError if C is not built."""
    global _c, BACKEND
    if name not in ("c", "python"):
        raise ValueError(f"unknown backend {name!r}")
    import importlib
    _c = importlib.import_module("_bpe") if name == "c" else None
    BACKEND = name


def _c_splits(pattern):
    """Whether the C extension can pre-split with this pattern itself (only SPLIT_PATTERN,
    and only texts without lone surrogates; the regex module does everything else)."""
    return _c is not None and pattern == _c.SPLIT_PATTERN


def text_to_bytes(text):
    """str -> bytes. Lone surrogates from bytes decoded with 'surrogateescape' become those
    raw bytes again, so text read from invalid UTF-8 round-trips exactly."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates (never produced by decoding bytes)
        return text.encode("utf-8", "surrogatepass")


def bytes_to_text(data):
    """bytes -> str, the inverse of text_to_bytes: invalid UTF-8 becomes surrogate escapes."""
    return data.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# Training: the pure-Python reference.

def count_pairs(ids, counts=None, weight=1):
    """Count adjacent pairs in a list of ids, e.g. [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge_pair(ids, pair, new_id):
    """Replace every non-overlapping occurrence of pair, left to right:
    merge_pair([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]; merge_pair([5, 5, 5], (5, 5), 6) -> [6, 5]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_merges_python(chunks, counts, num_merges):
    """Learn up to num_merges merges from unique chunks (bytes) and how often each occurs.
    Returns a list of pairs; merge k creates token id 256 + k.

    Each unique chunk is stored once with its count, pair counts are kept up to date
    incrementally (only chunks that contain the merged pair are touched), and a heap with
    lazy deletion finds the most frequent pair without scanning all of them."""
    words = [list(c) for c in chunks]
    pair_counts = {}  # (a, b) -> total count over all chunks
    where = {}  # (a, b) -> set of chunk indices that (may) contain it
    for i, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + count
            where.setdefault(pair, set()).add(i)
    # heap entries are (-count, a, b): the smallest entry is the most frequent pair, ties go
    # to the smallest (a, b). Entries go stale when a count changes; they are skipped on pop.
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < num_merges and heap:
        neg_count, a, b = heapq.heappop(heap)
        pair = (a, b)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = set()
        for i in where.pop(pair, ()):
            word, count = words[i], counts[i]
            new_word = merge_pair(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # the pair left this chunk in an earlier merge
            # subtract the old chunk's pairs, add the new chunk's pairs
            for p in zip(word, word[1:]):
                pair_counts[p] -= count
                changed.add(p)
            for p in zip(new_word, new_word[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + count
                where.setdefault(p, set()).add(i)
                changed.add(p)
            words[i] = new_word
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pair_counts.pop(p, None)
    return merges


def encode_chunk_python(data, ranks):
    """Encode one chunk (bytes) by applying merges in rank order, the way they were learned:
    always merge the adjacent pair whose merge came first. ranks maps (a, b) -> new id."""
    ids = list(data)
    while len(ids) >= 2:
        best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        ids = merge_pair(ids, best, ranks[best])
    return ids


# ---------------------------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    def __init__(self, merges, special_tokens=(), pattern=SPLIT_PATTERN):
        self.pattern = pattern
        self.compiled_pattern = regex.compile(pattern)
        self.merges = [tuple(p) for p in merges]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}  # (a, b) -> id
        # the bytes of every token: 256 single bytes, then each merge's two halves joined
        self.vocab = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        first_special = 256 + len(self.merges)
        self.special_tokens = {s: first_special + i for i, s in enumerate(special_tokens)}
        self.inverse_special = {i: s for s, i in self.special_tokens.items()}
        self._cache = {}  # chunk bytes -> ids, for the pure-Python encoder (bounded: CACHE_MAX_...)
        self._cache_bytes = self._cache_ids = 0  # what the cache holds: bytes of chunks, ids
        self._c_encoder = _c.Encoder(self.merges) if _c is not None else None
        self._c_splits = _c_splits(pattern)

    @property
    def vocab_size(self):
        return 256 + len(self.merges) + len(self.special_tokens)

    # -- training --------------------------------------------------------------------------

    @classmethod
    def count_chunks(cls, texts, pattern=SPLIT_PATTERN):
        """Pre-split every text and count unique chunks: -> Counter {chunk bytes: count}."""
        compiled = regex.compile(pattern)
        fast = _c.ChunkCounter() if _c_splits(pattern) else None
        counter = Counter()
        for text in texts:
            if fast is None or not fast.add(text):  # add() is False for lone surrogates
                counter.update(compiled.findall(text))
        out = Counter(fast.counts() if fast is not None else ())  # {chunk bytes: count}
        for chunk, n in counter.items():
            out[text_to_bytes(chunk)] += n
        return out

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN, special_tokens=()):
        """Train on an iterable of str. vocab_size counts the 256 bytes, the merges and the
        special tokens. If the text runs out of pairs first, the vocabulary comes out smaller."""
        special_tokens = list(special_tokens)
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(special_tokens)} special tokens")
        chunk_counts = cls.count_chunks(texts, pattern)
        chunks = list(chunk_counts.keys())
        counts = list(chunk_counts.values())
        if _c is not None:
            merges = _c.train_merges(chunks, counts, num_merges)
        else:
            merges = train_merges_python(chunks, counts, num_merges)
        return cls(merges, special_tokens, pattern)

    # -- encoding / decoding ----------------------------------------------------------------

    def encode_ordinary(self, text):
        """Encode text with no special tokens at all."""
        if self._c_splits:
            ids = self._c_encoder.encode_text(text)  # pre-split and encode in C
            if ids is not None:  # None: lone surrogates, split below with the regex module
                return ids
        chunks = [text_to_bytes(c) for c in self.compiled_pattern.findall(text)]
        if self._c_encoder is not None:
            return self._c_encoder.encode_chunks(chunks)
        ids = []
        for chunk in chunks:
            cached = self._cache.get(chunk)
            if cached is None:
                cached = encode_chunk_python(chunk, self.ranks)
                if (len(chunk) <= CACHE_MAX_CHUNK and len(self._cache) < CACHE_MAX_ENTRIES
                        and self._cache_bytes < CACHE_MAX_BYTES and 4 * self._cache_ids < CACHE_MAX_BYTES):
                    self._cache[chunk] = cached
                    self._cache_bytes += len(chunk)
                    self._cache_ids += len(cached)
            ids.extend(cached)
        return ids

    def encode(self, text, allowed_special=()):
        """Encode text. Special-token strings become special ids only if listed in
        allowed_special ("all" allows every one); otherwise they are encoded as ordinary text."""
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        allowed = [s for s in self.special_tokens if s in allowed_special]
        if not allowed:
            return self.encode_ordinary(text)
        split = "(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids = []
        for i, part in enumerate(regex.split(split, text)):
            if i % 2 == 1:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(self, texts, allowed_special=()):
        return [self.encode(t, allowed_special) for t in texts]

    def token_to_bytes(self, token_id):
        if token_id in self.inverse_special:
            return self.inverse_special[token_id].encode("utf-8")
        return self.vocab[token_id]

    def decode_bytes(self, ids):
        """The exact bytes behind a list of ids (special tokens as their text)."""
        return b"".join(self.token_to_bytes(i) for i in ids)

    def decode(self, ids):
        return bytes_to_text(self.decode_bytes(ids))

    def mergeable_ranks(self):
        """dict bytes -> rank in tiktoken's convention (rank == token id)."""
        return {token: i for i, token in enumerate(self.vocab)}

    # -- files ------------------------------------------------------------------------------

    def save(self, path):
        """Write a JSON file: the split pattern, the merges in order (each a pair of ids that
        makes the id 256 + k), the special tokens, and for reading only, every merged token."""
        data = {
            "format": FILE_FORMAT,
            "pattern": self.pattern,
            "merges": [list(p) for p in self.merges],
            "special_tokens": list(self.special_tokens),
            "tokens_for_reading": {256 + k: self.vocab[256 + k].decode("utf-8", "backslashreplace")
                                   for k in range(len(self.merges))},
        }
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not a valid tokenizer file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a {FILE_FORMAT} tokenizer file")
        return cls(data["merges"], data["special_tokens"], data["pattern"])
