"""The C backend (_bpe) against the pure-Python spec in bpe.py: same chunks, merges, ids."""

import contextlib
import itertools
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpe

try:
    import _bpe
except ImportError:
    pytest.skip("the C extension _bpe is not built", allow_module_level=True)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def backend(name):
    old = bpe.BACKEND
    bpe.set_backend(name)
    try:
        yield
    finally:
        bpe.set_backend(old)


def train_both(texts, vocab_size, **kw):
    """The same training in each backend -> (C tokenizer, Python tokenizer)."""
    with backend("c"):
        tc = bpe.Tokenizer.train(texts, vocab_size, **kw)
    with backend("python"):
        tp = bpe.Tokenizer.train(texts, vocab_size, **kw)
    return tc, tp


def encoders(merges, **kw):
    with backend("c"):
        tc = bpe.Tokenizer(merges, **kw)
    with backend("python"):
        tp = bpe.Tokenizer(merges, **kw)
    assert tc._c_encoder is not None and tp._c_encoder is None
    return tc, tp


def check_round_trip(tok, text, ids):
    assert tok.decode_bytes(ids) == bpe.text_to_bytes(text)
    if bpe.bytes_to_text(bpe.text_to_bytes(text)) == text:  # no escapes that spell valid UTF-8
        assert tok.decode(ids) == text


def english_sample(n_sentences=3000, seed=0):
    """Deterministic English-like text: sentences, numbers, contractions, code, blank lines."""
    rng = random.Random(seed)
    words = ("the of and to in is that it for was on are with as I his they be at one have this from "
             "or had by word but what some we can out other were all there when up use your how said an "
             "each she which do their time if will way about many then them write would like so these her "
             "long make thing see him two has look more day could go come did number sound no most people "
             "my over know water than call first who may down side been now find tokenizer merges bytes "
             "Python training encoding regular expression vocabulary").split()
    contractions = ["don't", "it's", "we'll", "they've", "I'm", "you're", "she'd", "DON'T", "Bob's"]
    out = []
    for i in range(n_sentences):
        k = rng.randint(3, 14)
        sent = [rng.choice(words) for _ in range(k)]
        if rng.random() < 0.3:
            sent[rng.randrange(k)] = rng.choice(contractions)
        if rng.random() < 0.2:
            sent.insert(rng.randrange(k), str(rng.randint(0, 99999)))
        s = " ".join(sent)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?", ":", "...", ";"])
        out.append(s)
        r = rng.random()
        if r < 0.1:
            out.append("\n\n")
        elif r < 0.15:
            out.append("\n    x = f(y) + 12 * (z - 3)  # note\n")
        elif r < 0.2:
            out.append("\r\n")
        else:
            out.append(" ")
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Training and encoding agree


def test_worked_example():
    tc, tp = train_both(["aaabdaaabac"], 256 + 3)
    assert tc.merges == tp.merges == [(97, 97), (97, 98), (256, 257)]
    assert tc.encode("aaabdaaabac") == tp.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    # asking for more merges than there are pairs stops early, in both
    tc, tp = train_both(["aaabdaaabac"], 300)
    assert tc.merges == tp.merges and len(tc.merges) < 300 - 256


def test_english_sample():
    text = english_sample()
    tc, tp = train_both([text, text[:5000]], 800)
    assert tc.merges == tp.merges
    assert len(tc.merges) == 800 - 256
    sample = english_sample(400, seed=1)  # partly unseen text
    for t in (text, sample):
        ids = tc.encode(t)
        assert ids == tp.encode(t)
        check_round_trip(tc, t, ids)
    assert tc.encode_batch([sample, "", text[:99]]) == tp.encode_batch([sample, "", text[:99]])


def test_chunk_counts_agree():
    texts = [english_sample(300), "caf\u00e9 \u4e00\u4e8c 12345 '\u017f \udc80x", ""]
    with backend("c"):
        cc = bpe.Tokenizer.count_chunks(texts)
    with backend("python"):
        cp = bpe.Tokenizer.count_chunks(texts)
    assert cc == cp


def test_special_tokens():
    specials = ["<|bos|>", "<|user_start|>", "<|eos|>"]
    text = english_sample(200)
    tc, tp = train_both([text], 512, special_tokens=specials)
    assert tc.merges == tp.merges and tc.special_tokens == tp.special_tokens
    assert tc.vocab_size == tp.vocab_size == 512
    doc = "<|bos|>hello <|user_start|>what's up?<|eos|><|eos|> done"
    for allowed in ((), "all", {"<|eos|>"}):
        ids = tc.encode(doc, allowed_special=allowed)
        assert ids == tp.encode(doc, allowed_special=allowed)
        assert tc.decode(ids) == doc
    assert tc.encode(doc, allowed_special="all")[0] == tc.special_tokens["<|bos|>"]


def test_save_load_either_backend(tmp_path):
    text = english_sample(500)
    probe = english_sample(50, seed=2) + " \udcff\udc80 <|bos|>"
    for train_backend in ("c", "python"):
        with backend(train_backend):
            tok = bpe.Tokenizer.train([text], 700, special_tokens=["<|bos|>"])
        path = tmp_path / f"tok-{train_backend}.json"
        tok.save(path)
        expected = tok.encode(probe, allowed_special="all")
        for load_backend in ("c", "python"):
            with backend(load_backend):
                loaded = bpe.Tokenizer.load(path)
            assert loaded.merges == tok.merges
            assert loaded.special_tokens == tok.special_tokens
            assert loaded.encode(probe, allowed_special="all") == expected
            assert loaded.mergeable_ranks() == tok.mergeable_ranks()


def test_custom_pattern_uses_regex_split():
    pattern = r"\w+|\s+|[^\w\s]+"
    text = english_sample(300)
    tc, tp = train_both([text], 600, pattern=pattern)
    assert not tc._c_splits and tc._c_encoder is not None
    assert tc.merges == tp.merges
    assert tc.encode(text) == tp.encode(text)
    # a pattern with empty matches gives empty chunks
    tc, tp = train_both([text], 300, pattern=r"\w*")
    assert tc.merges == tp.merges
    assert tc.encode(text) == tp.encode(text)


def test_encoder_misuse_raises():
    enc = _bpe.Encoder.__new__(_bpe.Encoder)
    with pytest.raises(RuntimeError):
        enc.encode_text("abc")
    with pytest.raises(ValueError):
        _bpe.Encoder([(97, -1)])
    with pytest.raises(TypeError):
        _bpe.Encoder([(97, 98)]).encode_chunks(["not bytes"])
    with pytest.raises(TypeError):
        _bpe.train_merges([b"ab", "cd"], [1, 1], 3)
    with pytest.raises(ValueError):
        _bpe.train_merges([b"ab"], [1, 2], 3)


def test_long_runs():
    text = "a" * 20000 + " " * 5000 + "\n" * 3000 + "ab" * 4000 + "\u00e9" * 3000
    tc, tp = train_both([text], 300)
    assert tc.merges == tp.merges
    probe = "a" * 50001 + " " * 777 + "ab" * 1001
    ids = tc.encode(probe)
    assert ids == tp.encode(probe)
    check_round_trip(tc, probe, ids)


def test_lone_surrogates_fall_back_to_regex():
    text = english_sample(100) + " \ud800 \udfff x\udc80\udcff y " + "\udcc3\udca9"
    tc, tp = train_both([text, "plain"], 400)
    assert tc.merges == tp.merges
    assert tc.encode(text) == tp.encode(text)
    assert _bpe.split(text) is None
    assert tc._c_encoder.encode_text(text) is None


def test_threads_share_an_encoder():
    text = english_sample(1000)
    tc, tp = train_both([text], 800)
    parts = [english_sample(300, seed=s) for s in range(4)]
    expected = [tp.encode(p) for p in parts]
    got = [None] * len(parts)

    def work(i):
        for _ in range(3):
            got[i] = tc.encode(parts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


# The C code reads Python lists; Python code that runs meanwhile (a count's __index__, another
# thread while this one waits for a lock without the GIL) may change them. Each case runs in a
# fresh interpreter, so that an out-of-bounds read or write shows as a failed test, not a dead run,
# and must give a clear error or the result for the lists as they were passed.
MUTATED_DURING_THE_CALL = {
    "a count's __index__ empties the chunks": """
chunks = [b"abab", b"abc", b"bcd", b"cdcd"]
original = list(chunks)
class Count:
    def __index__(self):
        chunks.clear()
        return 2
assert _bpe.train_merges(chunks, [1, Count(), 1, 1], 10) == bpe.train_merges_python(original, [1, 2, 1, 1], 10)
""",
    "a count's __index__ lengthens a chunk": """
chunks = [b"abab", b"abc", b"bcd", b"cdcd"]
original = list(chunks)
class Count:
    def __index__(self):
        chunks[3] = b"cd" * (32 << 20)  # 64 MiB where the copy has room for 4 bytes
        return 2
assert _bpe.train_merges(chunks, [1, Count(), 1, 1], 10) == bpe.train_merges_python(original, [1, 2, 1, 1], 10)
""",
    "an id's __index__ empties the merges": """
merges = [(97, 98), None, (257, 100)]
original = [(97, 98), (256, 99), (257, 100)]
class Id:
    def __index__(self):
        merges.clear()
        return 256
merges[1] = (Id(), 99)
encoder = _bpe.Encoder(merges)
assert encoder.encode_chunks([b"abcd", b"xabc"]) == [258, 120, 257]
""",
    "another thread empties the chunks while encode_chunks waits for the lock": """
import threading, time
encoder = _bpe.Encoder([(97, 98)] + [(256 + k, 256 + k) for k in range(8)])
busy = threading.Thread(target=encoder.encode_text, args=((" " + "ab" * 256) * 40000,))  # ~1 s with the lock
busy.start()
time.sleep(0.2)
chunks = [b"ab", b"abab", b"xab"]
emptier = threading.Thread(target=lambda: (time.sleep(0.2), chunks.clear()))
emptier.start()
assert encoder.encode_chunks(chunks) == [256, 257, 120, 256]
busy.join()
emptier.join()
""",
    "counts() while another thread adds": """
import itertools, string, threading, time
text = " ".join("".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=4))
counter = _bpe.ChunkCounter()
adder = threading.Thread(target=counter.add, args=(text,))
adder.start()
seen = []
while adder.is_alive():
    seen.append(len(counter.counts()))
    time.sleep(0.001)  # let the adder take the GIL and start
adder.join()
assert all(n in (0, 26 ** 4) for n in seen), sorted(set(seen))[:5]
""",
}


@pytest.mark.parametrize("program", MUTATED_DURING_THE_CALL.values(), ids=MUTATED_DURING_THE_CALL.keys())
def test_lists_changed_during_a_call_are_safe(program):
    result = subprocess.run([sys.executable, "-c", "import _bpe, bpe\n" + program], cwd=Path(bpe.__file__).parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-1500:]}"


# ---------------------------------------------------------------------------------------------
# Random input

piece = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="ab '\n\r\t 019sSdlLvVeErR.,!\u017f\u00e9\u4e00\u3000\x1c\x85", max_size=16),
    st.sampled_from(["'s", "'LL", "'ve", "'Re", "'\u017f", "\r\n", "  \n ", "\x1c\x1d\x1e\x1f", "\u2167\u2168",
                     "\u0661\u0662\u0663", "\u3007", "\u4e00\u4e8c\u4e09", "\U0001F600!", "<|bos|>"]),
    st.lists(st.integers(0xDC80, 0xDCFF).map(chr), min_size=1, max_size=3).map("".join),
    st.builds(lambda c, n: c * n, st.characters(), st.integers(1, 2000)),
)
texts = st.lists(piece, max_size=8).map("".join)


@FAST
@given(texts, st.integers(0, 40))
def test_random_text_train_and_encode(text, extra_merges):
    tc, tp = train_both([text, text[::-1]], 256 + extra_merges)
    assert tc.merges == tp.merges
    ids = tc.encode(text)
    assert ids == tp.encode(text)
    check_round_trip(tc, text, ids)


SAMPLE_TOKENIZERS = train_both([english_sample(400, seed=5) + " caf\u00e9 \u4e00\u4e8c \u00e9\u00e9\u00e9"], 600,
                               special_tokens=["<|bos|>"])

@FAST
@given(texts)
def test_random_text_encode_with_fixed_merges(text):
    tc, tp = SAMPLE_TOKENIZERS
    for allowed in ((), "all"):
        ids = tc.encode(text, allowed_special=allowed)
        assert ids == tp.encode(text, allowed_special=allowed)
        check_round_trip(tc, text, ids)


pairs_input = st.lists(
    st.tuples(st.binary(min_size=0, max_size=12).map(lambda b: bytes(x % 4 + 97 for x in b)),
              st.integers(1, 5)), max_size=30)


@FAST
@given(pairs_input, st.integers(0, 30))
def test_train_merges_ties(items, num_merges):
    # a four-letter alphabet and small counts make many equally frequent pairs
    merged = {}
    for chunk, count in items:
        merged[chunk] = merged.get(chunk, 0) + count
    chunks, counts = list(merged), list(merged.values())
    expected = bpe.train_merges_python(chunks, counts, num_merges)
    assert _bpe.train_merges(chunks, counts, num_merges) == expected
    assert _bpe.train_merges(chunks[::-1], counts[::-1], num_merges) == expected
    # and encoding each chunk agrees with the Python encoder
    ranks = {pair: 256 + i for i, pair in enumerate(expected)}
    enc = _bpe.Encoder(expected)
    assert enc.encode_chunks(chunks) == [i for c in chunks for i in bpe.encode_chunk_python(c, ranks)]


# ---------------------------------------------------------------------------------------------
# The C pre-split is the regex module's SPLIT_PATTERN


def test_split_pattern_is_the_same_text():
    assert _bpe.SPLIT_PATTERN == bpe.SPLIT_PATTERN


def test_character_classes_match_regex_module():
    everything = "".join(chr(cp) for cp in range(0x110000))
    expected = bytearray(0x110000)
    for value, pattern in ((1, r"\p{L}"), (2, r"\p{N}"), (3, r"\s")):
        for m in regex.finditer(pattern, everything):
            expected[m.start()] = value
    assert _bpe.char_classes() == bytes(expected)


def test_split_exhaustive_short_strings():
    alphabet = ["a", "Z", "\u017f", "1", "\u00b9", "\u4e00", "\u3007", " ", "\t", "\n", "\r", "\x1c", "\x85",
                "\u3000", "'", "s", "L", "e", "v", "!", "\x00", "\U0001F600", "\u00e9"]
    compiled = regex.compile(bpe.SPLIT_PATTERN)
    for n in (1, 2, 3):
        for chars in itertools.product(alphabet, repeat=n):
            s = "".join(chars)
            assert _bpe.split(s) == compiled.findall(s), repr(s)


@settings(max_examples=300, deadline=None)
@given(texts)
def test_split_random(text):
    got = _bpe.split(text)
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        assert got is None
    else:
        assert got == regex.findall(bpe.SPLIT_PATTERN, text)


def test_split_on_sample():
    text = english_sample(2000) + "\n\u00bfQu\u00e9 tal?  \u0416\u0443\u043a 42\u0663 \u2003\u2003x\r\n\r\n"
    assert _bpe.split(text) == regex.findall(bpe.SPLIT_PATTERN, text)
