"""The packing loader's invariants, bits-per-byte against a hand computation, and the real-data path."""
import itertools
import json
import math
import random
import types

import pytest
import torch

import bpe
import nanochat_one as nc
import realdata

BOS = 999


def paris_tokenizer():
    """The loader and drill tests' tokenizer: trained on one sentence repeated, vocab size 300."""
    return bpe.Tokenizer.train(["The capital of France is Paris. " * 50], 300, special_tokens=nc.SPECIAL_TOKENS)


def fake_docs(seed=0):
    """docs_from(start) for pack_rows: document i is BOS then its own index repeated 1-40 times."""
    def docs_from(start):
        for i in itertools.count(start):
            yield i, [BOS] + [i] * random.Random(seed * 100_003 + i).randint(1, 40)
    return docs_from


def test_pack_rows_invariants():
    B, T = 4, 32
    batches = nc.pack_rows(fake_docs(), B, T, buffer_size=16)
    seen = []
    for _ in range(20):
        rows, position = next(batches)
        assert len(rows) == B
        for row in rows:
            assert len(row) == T + 1  # no padding: every row is full
            assert row[0] == BOS  # every row starts at a document start
            # the row is whole documents, possibly the last one cropped: split at BOS
            docs = []
            for tok in row:
                if tok == BOS:
                    docs.append([])
                else:
                    docs[-1].append(tok)
            for d in docs:
                assert len(set(d)) <= 1  # tokens of one document only, in one piece
            seen += [d[0] for d in docs if d]
    assert len(seen) == len(set(seen))  # no document is used twice
    assert position["last"] >= max(seen)


def test_pack_rows_resumes_exactly_from_its_state():
    """Packing from a batch's state gives the batches that followed it, as if never stopped."""
    B, T = 4, 32
    straight = [rows for (rows, _), _ in zip(nc.pack_rows(fake_docs(), B, T, buffer_size=16), range(12))]
    packer = nc.pack_rows(fake_docs(), B, T, buffer_size=16)
    for _ in range(5):
        _, state = next(packer)
    assert len(state["buffer"]) == 15 and state["last"] >= max(state["buffer"])
    state = json.loads(json.dumps(state))  # as it travels through a checkpoint's metadata
    resumed = [rows for (rows, _), _ in zip(nc.pack_rows(fake_docs(), B, T, state, buffer_size=16), range(7))]
    assert resumed == straight[5:]


def test_pack_rows_crops_little():
    body_length = {i: len(doc) - 1 for (i, doc), _ in zip(fake_docs(1)(0), range(10_000))}  # minus BOS
    kept = {}  # document id -> how many of its tokens made it into rows
    for (rows, _), _ in zip(nc.pack_rows(fake_docs(1), 8, 64), range(30)):
        for row in rows:
            for tok in row:
                if tok != BOS:
                    kept[tok] = kept.get(tok, 0) + 1
    cropped = sum(body_length[i] - n for i, n in kept.items())
    assert all(n <= body_length[i] for i, n in kept.items())
    assert cropped / (30 * 8 * 65) < 0.1  # best fit: the only waste is the crop that fills a row


def test_evaluate_bpb_by_hand():
    # a "model" that gives every target the same loss; bytes per token differ
    token_bytes = torch.tensor([1, 2, 3, 0])  # token 3 is special: 0 bytes, ignored

    class Constant:
        config = types.SimpleNamespace(vocab_size=4)

        def __call__(self, x, y, loss_reduction="none"):
            return torch.full(y.shape, 0.5).reshape(-1)

    y = torch.tensor([[0, 1, 2, 3], [1, 1, -1, 3]])
    batches = iter([(torch.zeros_like(y), y, 0)])
    bpb = nc.evaluate_bpb(Constant(), batches, 1, token_bytes)
    nats = 0.5 * 5  # five targets with bytes: 0, 1, 2, 1, 1
    nbytes = 1 + 2 + 3 + 2 + 2
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes))


def test_base_batches_shift_and_shard(base_dir):
    tok = paris_tokenizer()
    args = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.0, replay=0.0)
    full = nc.base_batches(args, tok, "train", 2, 16, nc.Dist(), "cpu")
    x, y, _ = next(full)
    assert x.shape == y.shape == (2, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert (x[:, 0] == tok.special_tokens["<|bos|>"]).all()
    # two ranks see disjoint documents
    positions = []
    for rank in (0, 1):
        docs = []
        gen = nc.document_stream(args, "train")
        for position, _ in gen:
            if position % 2 == rank:
                docs.append(position)
            if len(docs) == 5:
                break
        positions.append(set(docs))
    assert not positions[0] & positions[1]


def write_parquet(path, texts):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path, row_group_size=3)


def test_parquet_documents_split_and_resume(tmp_path):
    write_parquet(tmp_path / "shard_00000.parquet", [f"train doc {i}" for i in range(10)])
    write_parquet(tmp_path / "shard_00001.parquet", [f"val doc {i}" for i in range(4)])
    train = realdata.parquet_documents(tmp_path, "train")
    first = [next(train) for _ in range(12)]
    assert first[0] == (0, "train doc 0") and first[9] == (9, "train doc 9")
    assert first[10] == (10, "train doc 0")  # second epoch
    resumed = realdata.parquet_documents(tmp_path, "train", start=7)
    assert next(resumed) == (7, "train doc 7")
    assert [t for _, t in realdata.parquet_documents(tmp_path, "val")] == [f"val doc {i}" for i in range(4)]


def test_parquet_ranks_read_only_their_own_row_groups(tmp_path, monkeypatch):
    """Two ranks: every other row group each (rows of 3), together every document once, each
    resuming at a position of its own; a rank never reads the other's row groups."""
    pq = pytest.importorskip("pyarrow.parquet")
    write_parquet(tmp_path / "shard_00000.parquet", [f"train doc {i}" for i in range(10)])  # groups 0-2, 3-5, 6-8, 9
    write_parquet(tmp_path / "shard_00001.parquet", [f"val doc {i}" for i in range(4)])
    read, real_read = [], pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **k: read.append(i) or real_read(self, i, **k))
    ranks = [[next(stream) for _ in range(5)] for stream in (realdata.parquet_documents(tmp_path, "train", 0, r, 2) for r in (0, 1))]
    assert [p for p, _ in ranks[0]] == [0, 1, 2, 6, 7] and [p for p, _ in ranks[1]] == [3, 4, 5, 9, 13]
    assert read == [0, 2, 1, 3, 1]  # rank 0: groups 0 and 2; rank 1: 1, 3 and (epoch 2) 1 again
    assert next(realdata.parquet_documents(tmp_path, "train", 4, 1, 2)) == (4, "train doc 4")
    with pytest.raises(realdata.DataError, match="too few for 3 ranks"):
        next(realdata.parquet_documents(tmp_path, "val", 0, 2, 3))  # the validation shard has 2 row groups


def test_parquet_needs_two_shards(tmp_path):
    write_parquet(tmp_path / "only.parquet", ["x"])
    with pytest.raises(realdata.DataError, match="need at least 2"):
        next(realdata.parquet_documents(tmp_path, "train"))


def test_copy_drills_repeat_each_sequence_and_replace_their_share_of_documents(base_dir):
    tok = paris_tokenizer()
    pool = nc.drill_ids(tok)
    assert pool and all(256 <= t < min(tok.special_tokens.values()) for t in pool)  # merged, never special
    bos = tok.special_tokens["<|bos|>"]
    drill = nc.copy_drill(random.Random(0), pool, bos)
    assert drill[0] == bos and len(drill) >= 256
    ids, i = drill[1:], 0
    while i < len(ids):  # the drill parses as sequences of 5-40 ids, each followed by itself
        n = next(n for n in range(5, 41) if ids[i:i + n] == ids[i + n:i + 2 * n])
        assert set(ids[i:i + n]) <= set(pool)
        i += 2 * n
    # a share of 0.2 of 2,000 documents: 400 expected, binomial sd sqrt(2000 * 0.2 * 0.8) = 17.9; 6 sd either side
    docs = [(p, [-1]) for p in range(2000)]
    replaced = [p for p, ids in nc.with_drills(docs, 0.2, tok) if ids != [-1]]
    assert abs(len(replaced) - 400) <= 6 * 17.9
    # chosen by position: a resumed stream replaces the same documents with the same drills
    again = dict(nc.with_drills(docs[1000:], 0.2, tok))
    assert [p for p in replaced if p >= 1000] == [p for p, ids in again.items() if ids != [-1]]
    assert all(again[p] == dict(nc.with_drills(docs, 0.2, tok))[p] for p in replaced if p >= 1000)
    assert list(nc.with_drills(docs, 0.0, tok)) == docs


def test_drills_leave_out_the_tokens_that_write_numbers():
    text = "Twenty-six is written as 26. Seventeen apples and 17 pears went to the market. " * 40
    tok = bpe.Tokenizer.train([text], 400, special_tokens=nc.SPECIAL_TOKENS)
    pool = nc.drill_ids(tok)
    pieces = {tok.decode([t]).strip(" -").lower() for t in pool}
    assert not any(c.isdigit() for piece in pieces for c in piece)
    assert not pieces & {"twenty", "six", "seventeen", "seven", "teen"}
    merged = {tok.decode([t]).strip(" -").lower() for t in range(256, min(tok.special_tokens.values()))}
    assert {"twenty", "26", "apples", "market"} <= merged  # the tokenizer has them; the drills keep only the words
    assert {"apples", "market"} <= pieces


def test_drills_train_on_every_token_in_mid_and_stay_out_of_validation(base_dir):
    tok = paris_tokenizer()
    args = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.5, replay=0.0)
    pool = torch.tensor(nc.drill_ids(tok))

    def in_pool(x):
        return torch.isin(x, pool)

    x, y, _ = next(nc.mid_batches(args, tok, "train", 8, 256, nc.Dist(), "cpu"))
    drill_rows = [r for r in range(8) if in_pool(x[r]).float().mean() > 0.5]  # TinyWorld's own: mostly bytes
    assert drill_rows  # P(no drill in 8 rows at share 0.5) is negligible: rows hold several documents each
    for r in drill_rows:  # inside a drill every target is trained (no -1) but where a conversation's mask says so
        inside = in_pool(x[r, 1:])
        assert (y[r, :-1][inside] >= 0).all()
    shares = {}  # base_batches asks for drills in training only: validation measures the text
    real = nc.with_drills

    def recording(docs, share, tokenizer, *rest):
        shares[split] = share
        return real(docs, share, tokenizer, *rest)

    for split in ("train", "val"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(nc, "with_drills", recording)
            next(nc.base_batches(args, tok, split, 2, 16, nc.Dist(), "cpu"))
    assert shares == {"train": 0.5, "val": 0.0}
