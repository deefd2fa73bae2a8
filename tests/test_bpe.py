"""The pure-Python BPE against worked examples and a naive re-counting trainer."""
import random

import pytest

import bpe
from bpe import Tokenizer, count_pairs, merge_pair, train_merges_python


def test_docstring_examples():
    assert count_pairs([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    assert merge_pair([5, 5, 5], (5, 5), 6) == [6, 5]


def test_worked_example_aaabdaaabac():
    # aa is the most frequent pair (4) -> Z; then "ab" and "Za" tie at 2 and the smaller pair
    # (97, 98) wins -> Y; then ZY -> X:  aaabdaaabac -> ZYdZYac -> XdXac
    merges = train_merges_python([b"aaabdaaabac"], [1], 3)
    assert merges == [(97, 97), (97, 98), (256, 257)]
    tok = Tokenizer(merges)
    assert [tok.vocab[i] for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


def naive_train(chunks, counts, num_merges):
    """Oracle: recount every pair from scratch before each merge (what the incremental trainer avoids)."""
    words = [list(c) for c in chunks]
    merges = []
    for k in range(num_merges):
        stats = {}
        for w, n in zip(words, counts):
            count_pairs(w, stats, n)
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        merges.append(best)
        words = [merge_pair(w, best, 256 + k) for w in words]
    return merges


def test_incremental_training_matches_naive_recount():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "aaaa", "banana", "abab", "zzzzzz", "héllo", "世界"]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(20)]
    chunk_counts = Tokenizer.count_chunks(texts)
    chunks = list(chunk_counts)
    counts = [chunk_counts[c] for c in chunks]
    assert train_merges_python(chunks, counts, 60) == naive_train(chunks, counts, 60)


def test_training_stops_when_pairs_run_out():
    tok = Tokenizer.train(["ab ab ab"], vocab_size=1000)
    assert tok.vocab_size < 1000
    assert tok.encode("ab ab") == [tok.vocab.index(b"ab"), tok.vocab.index(b" ab")]


SAMPLES = ["", "hello world", "Hello, World! 123456", "emoji 😀🎉 mixed", "中文字符测试 and 日本語",
           "tabs\tand\nnewlines\r\n  spaces   ", "don't we'll I'M", "a" * 500]


@pytest.fixture(scope="module")
def tok():
    text = "\n".join(SAMPLES * 5) + " the quick brown fox jumps over the lazy dog " * 20
    return Tokenizer.train([text], vocab_size=400, special_tokens=["<|bos|>", "<|end|>"])


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_invalid_utf8(tok):
    raw = b"ok \xff\xfe broken \xc3 then \xe2\x82 end"
    text = raw.decode("utf-8", "surrogateescape")
    ids = tok.encode(text)
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == text


def test_decode_is_exact_for_any_token_sequence(tok):
    # a token whose bytes are half of a multi-byte character still decodes losslessly
    ids = tok.encode("é")  # 2 bytes
    for i in ids:
        assert tok.decode_bytes([i]) == tok.vocab[i]
    ids = [0xC3, 0xA9]  # the two raw bytes of é as single-byte tokens
    assert tok.decode(ids) == "é"


def test_special_tokens_only_when_allowed(tok):
    bos = tok.special_tokens["<|bos|>"]
    assert bos == 256 + len(tok.merges)
    text = "hi <|bos|> there"
    ordinary = tok.encode(text)
    assert bos not in ordinary
    assert tok.decode(ordinary) == text
    allowed = tok.encode(text, allowed_special={"<|bos|>"})
    assert allowed.count(bos) == 1
    assert tok.decode(allowed) == text
    assert tok.encode("<|end|><|bos|>", allowed_special="all") == [tok.special_tokens["<|end|>"], bos]


def test_mergeable_ranks_tiktoken_convention(tok):
    ranks = tok.mergeable_ranks()
    assert len(ranks) == 256 + len(tok.merges)
    assert all(ranks[bytes([i])] == i for i in range(256))
    for k, (a, b) in enumerate(tok.merges):
        assert ranks[tok.vocab[a] + tok.vocab[b]] == 256 + k


def test_save_load(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.special_tokens == tok.special_tokens
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert "tokens_for_reading" in path.read_text()


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a"):
        Tokenizer.load(bad)
    bad.write_text("{truncated")
    with pytest.raises(ValueError, match="not a valid"):
        Tokenizer.load(bad)


def test_backend_is_reported():
    assert bpe.BACKEND in ("c", "python")


def python_tokenizer(monkeypatch, merges):
    monkeypatch.setattr(bpe, "_c", None)  # the pure-Python encoder and its cache, whether or not C is built
    tok = Tokenizer(merges)
    assert tok._c_encoder is None
    return tok


def test_python_cache_keeps_no_long_chunks(monkeypatch):
    # distinct long requests, one chunk each: the cache would keep every one of them
    tok = python_tokenizer(monkeypatch, [(97, 98), (256, 256)])
    for i in range(1, 60):
        text = "ab" * 200 + "c" * i
        assert tok.encode(text) == bpe.encode_chunk_python(text.encode(), tok.ranks)
    assert not tok._cache


SHORT_WORDS = [" w" + a + b for a in "abcdefgh" for b in "ijkl"]  # 4 bytes, 3 ids: " w" a b
LONG_WORDS = ["ab" * 64 + c for c in "cdefghijklmnop"]  # 129 bytes, 2 ids: (ab)*64 c


@pytest.mark.parametrize("limit, value, words, kept", [
    ("CACHE_MAX_ENTRIES", 8, SHORT_WORDS, 8),
    ("CACHE_MAX_BYTES", 40, SHORT_WORDS, 4),  # ids (4 bytes each, as the C encoder stores them): 12, 24, 36, 48
    ("CACHE_MAX_BYTES", 300, LONG_WORDS, 3),  # chunk bytes: 129, 258, 387
])
def test_python_cache_stops_growing(monkeypatch, limit, value, words, kept):
    monkeypatch.setattr(bpe, limit, value)
    tok = python_tokenizer(monkeypatch, [(32, 119), (97, 98)] + [(257 + k, 257 + k) for k in range(6)])
    for word in words:
        assert tok.encode(word) == bpe.encode_chunk_python(word.encode(), tok.ranks)
    assert len(tok._cache) == kept
