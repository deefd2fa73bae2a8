"""Chat training data: the mid and SFT loaders' masks, TinyWorld's chat mixtures and splits, and
the real-data mixtures read from local files in the hub's schemas."""
import itertools
import json
import math
import types
import zlib

import pytest
import torch

import nanochat_one as nc
import realdata
import tinyworld
from conftest import hello_tokenizer


def test_mid_loader_masks_only_tool_outputs(tok):
    # with replayed pretraining documents among the conversations: they are trained on every token
    args = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.0, replay=0.3)
    # the packer starts each row with the longest waiting example: the documents come first
    batches = list(itertools.islice(nc.mid_batches(args, tok, "train", 8, 256, nc.Dist(), "cpu"), 16))
    x, y = torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches])
    s = tok.special_tokens
    n_ignored = 0
    assert (x[:8] == s["<|user_start|>"]).sum() == 0 and (x == s["<|user_start|>"]).sum() > 0
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        for i, target in enumerate(row_y[:-1]):
            token = row_x[i + 1]  # the token that target i asks the model to predict
            inside = s["<|output_start|>"] in row_x[max(0, i - 20):i + 2] and s["<|output_end|>"] not in row_x[max(0, i - 20):i + 1]
            if target == -1:
                n_ignored += 1
                assert inside, tok.decode(row_x[max(0, i - 20):i + 2])  # only tool outputs are ignored
            else:
                assert target == token
    assert n_ignored > 0, "the mixture contains word problems with calculator outputs"


def test_sft_loader_supervises_only_assistant(tok):
    args = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.0, replay=0.0)
    x, y, _ = next(nc.sft_batches(args, tok, "train", 4, 256, nc.Dist(), "cpu"))
    s = tok.special_tokens
    assert (x[:, 0] == s["<|bos|>"]).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        text_supervised = tok.decode([t for t in row_y if t >= 0])
        assert "<|user_start|>" not in text_supervised and "<|assistant_end|>" in text_supervised
        assert s["<|user_end|>"] not in [t for t in row_y if t >= 0]


def test_tinyworld_splits_are_disjoint():
    train = {c["key"] for _, c in zip(range(300), (c for _, c in tinyworld.tinyworld_chat_examples("train")))}
    test_items = tinyworld.tinyworld_eval_items("fact", "test", n=50)
    assert len(test_items) == 50
    assert not {item["key"] for item in test_items} & train


def chat_keys(split, stage, n=400):
    """The keys of the first n examples of a stage's stream (a conversation's questions joined by "|")."""
    return [c["key"] for _, c in itertools.islice(tinyworld.tinyworld_chat_examples(split, stage=stage), n)]


def test_sft_mixture_adds_hard_word_problems_and_no_stage_trains_on_test_keys():
    hard = {(stage, split): sum(key.startswith("hwp:") for key in chat_keys(split, stage)) / 400
            for stage, split in (("mid", "train"), ("mid", "test"), ("sft", "train"))}
    assert hard["mid", "train"] == hard["mid", "test"] == 0
    # 4 of sft's weight 12; a hard problem is kept with p ~ 0.8, the others with 0.6**3 (three fact questions
    # in one conversation) to 0.8: 33..47% of those kept, give or take 5 standard errors, 5 * sqrt(0.25 / 400)
    assert 0.33 - 0.125 < hard["sft", "train"] < 0.47 + 0.125
    held_out = {item["key"] for task in ("fact", "multiple_choice", "word_problem", "hard_word_problem")
                for item in tinyworld.tinyworld_eval_items(task, "test", n=400)}
    for stage in ("mid", "sft"):
        train, test = ({key for keys in chat_keys(split, stage) for key in keys.split("|")}
                       for split in ("train", "test"))
        assert all(tinyworld.tinyworld_split(key) == "train" for key in train)
        assert all(zlib.crc32(key.encode()) % (20 if key.split(":")[0] in tinyworld.FACT_KINDS else 10)
                   < (12 if key.split(":")[0] in tinyworld.FACT_KINDS else 8) for key in train)  # the train buckets
        assert not train & test and not train & held_out
        assert test & held_out  # the streams and the evaluation ask about the same things


def write_chat_sources(folder, split, counts):
    """Small local files in the hub's schemas: {source: rows} for one split (MMLU's train rows
    wrapped in a "train" field, as the hub's auxiliary_train config has them)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for name, n in counts.items():
        (folder / name).mkdir(exist_ok=True)
        if name == "smoltalk":
            rows = [dict(messages=[dict(role="user", content=f"hi {split} {i}"), dict(role="assistant", content=f"hello {i}")])
                    for i in range(n)]
        elif name == "mmlu":
            rows = [dict(question=f"{i}+2? ({split})", choices=[str(i + 1), str(i + 2), "5", "6"], answer=1, subject="math")
                    for i in range(n)]
            if split == "train":
                rows = [dict(train=row) for row in rows]
        elif name == "gsm8k":
            rows = [dict(question=f"Tom has {i} apples and buys 3. How many? ({split})", answer=f"{i}+3 = <<{i}+3={i + 3}>>{i + 3}\n#### {i + 3}")
                    for i in range(n)]
        else:  # ARC
            rows = [dict(id=str(i), question=f"Which is liquid? ({split} {i})", choices=dict(text=["rock", "water"], label=["A", "B"]),
                         answerKey="B") for i in range(n)]
        if name == "mmlu":
            pq.write_table(pa.Table.from_pylist(rows), folder / name / f"{split}.parquet")
        else:
            (folder / name / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def source_of(conversation):
    user = conversation["messages"][0]["content"]
    return "smoltalk" if user.startswith("hi") else "gsm8k" if "apples" in user else "arc" if "liquid" in user else "mmlu"


def test_real_chat_mixtures_from_local_files(tmp_path):
    """nanochat's mixtures: every row once per epoch, shuffled (so each stretch and each rank holds
    the sources in their proportions), MMLU read from its wrapped schema, validation on test splits."""
    pytest.importorskip("datasets")
    write_chat_sources(tmp_path, "train", dict(smoltalk=60, mmlu=30, gsm8k=10, arc_easy=6, arc_challenge=4))
    write_chat_sources(tmp_path, "test", dict(smoltalk=8, mmlu=6, gsm8k=4))
    args = types.SimpleNamespace(data="hf", data_dir=str(tmp_path), copy_drills=0.0, replay=0.0)
    tok = hello_tokenizer()
    epoch = [c for _, c in zip(range(100), (c for _, c in nc.chat_examples(args, "train", stage="mid")))]
    firsts = [c["messages"][0]["content"] for c in epoch]
    assert len(set(firsts)) == 100  # each of the 100 rows once
    assert [source_of(c) for c in epoch].count("mmlu") == 30
    assert [source_of(c) for c in epoch[:50]] != sorted(source_of(c) for c in epoch[:50])  # interleaved, not in blocks
    for rank in range(3):  # sharded by position: every rank gets every source
        assert {source_of(c) for c in epoch[rank::3]} == {"smoltalk", "mmlu", "gsm8k"}
    mmlu = next(c for c in epoch if source_of(c) == "mmlu")
    assert mmlu["messages"][1]["content"] == "B" and "\n- 7 B\n" in mmlu["messages"][0]["content"]
    gsm8k = next(c for c in epoch if source_of(c) == "gsm8k")
    assert gsm8k["messages"][1]["content"][1]["type"] == "python"
    second = [c for _, c in zip(range(100), (c for _, c in nc.chat_examples(args, "train", start=100, stage="mid")))]
    assert [c["messages"] for c in second] == [c["messages"] for c in epoch]  # the next epoch, in the same order
    val = [c for _, c in zip(range(18), (c for _, c in nc.chat_examples(args, "val", stage="mid")))]
    assert all("(test" in c["messages"][0]["content"] or "hi test" in c["messages"][0]["content"] for c in val)
    assert sorted(source_of(c) for c in val) == ["gsm8k"] * 4 + ["mmlu"] * 6 + ["smoltalk"] * 8
    sft = [c for _, c in zip(range(80), (c for _, c in nc.chat_examples(args, "train", stage="sft")))]
    assert sorted({source_of(c) for c in sft}) == ["arc", "gsm8k", "smoltalk"]
    assert sorted(source_of(c) for c in sft) == ["arc"] * 10 + ["gsm8k"] * 10 + ["smoltalk"] * 60  # one epoch
    for conversation in epoch + val + sft:
        nc.render_conversation(tok, conversation)


def test_real_data_epochs(tmp_path, monkeypatch):
    """--data hf trains mid and SFT for one epoch of their mixture: SFT's conversations over the
    conversations a step, mid's rendered tokens over the tokens a step."""
    pytest.importorskip("datasets")
    write_chat_sources(tmp_path, "train", dict(smoltalk=60, mmlu=30, gsm8k=10, arc_easy=6, arc_challenge=4))
    tok = hello_tokenizer()
    monkeypatch.setattr(nc, "get_tokenizer", lambda: tok)
    args = types.SimpleNamespace(data="hf", data_dir=str(tmp_path), device_batch_size=2, max_seq_len=32, total_batch_size=128,
                                copy_drills=0.0, replay=0.0)
    assert nc.epoch_steps(args, nc.Dist(), "sft", tok) == 80 // (2 * 2)  # 80 conversations, 2 rows x 2 micro-steps a step
    tokens = sum(len(nc.render_conversation(tok, c)[0]) for _, c in zip(range(100), (c for _, c in nc.chat_examples(args, "train"))))
    assert nc.epoch_steps(args, nc.Dist(), "mid", tok) == math.ceil(tokens / 128)


def test_mmlu_flat_schema_and_a_missing_column(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "train.jsonl").write_text(json.dumps(dict(question="2+2?", choices=["3", "4"], answer=1)) + "\n")
    assert realdata.load_rows("mmlu", "train", str(tmp_path))[0]["answer"] == 1
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps(dict(question="q", solution="#### 1")) + "\n")
    with pytest.raises(realdata.DataError, match="has no column answer"):
        realdata.load_rows("gsm8k", "train", str(tmp_path))


def test_real_chat_data_offline_message(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(realdata.DataError, match="for offline use put train"):
        realdata.load_rows("gsm8k", "train", str(tmp_path))


def test_replay_puts_pretraining_documents_among_training_conversations(tok):
    args = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.0, replay=0.3)
    first = list(itertools.islice(nc.chat_examples(args, "train", stage="sft"), 1000))
    replayed = [(p, c) for p, c in first if "document" in c]
    # binomial: 300 expected, one standard deviation 14.5; 5 of them either side
    assert 227 < len(replayed) < 373
    for position, example in replayed[:20]:  # pretraining text of its own seed, the same on every run
        assert example["document"] == tinyworld.tinyworld_document(tinyworld.random.Random(f"replay:{position}"))
    # a resume from position p meets the same examples from p on
    later = list(itertools.islice(nc.chat_examples(args, "train", first[500][0], stage="sft"), 10))
    assert later == first[500:510]
    assert not any("document" in c for _, c in itertools.islice(nc.chat_examples(args, "val", stage="sft"), 300))
    off = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.0, replay=0.0)
    assert [p for p, c in itertools.islice(nc.chat_examples(off, "train", stage="sft"), 1000)] == [p for p, _ in first]
    # rendered as base reads it: bos, then the text, every token trained; cropped like a conversation
    ids, mask = nc.render_example(tok, replayed[0][1])
    assert ids == [tok.special_tokens["<|bos|>"]] + tok.encode_ordinary(replayed[0][1]["document"])
    assert mask == [1] * len(ids)
    assert nc.render_example(tok, replayed[0][1], max_tokens=7) == (ids[:7], mask[:7])
    conversation = next(c for _, c in first if "messages" in c)
    assert nc.render_example(tok, conversation, 64) == nc.render_conversation(tok, conversation, 64)


def test_sft_rows_of_replayed_documents_train_on_the_text(tok):
    args = types.SimpleNamespace(data="tinyworld", data_dir=None, copy_drills=0.0, replay=0.5)
    x, y, _ = next(nc.sft_batches(args, tok, "train", 16, 128, nc.Dist(), "cpu"))
    user_start = tok.special_tokens["<|user_start|>"]
    documents = [r for r in range(16) if user_start not in x[r].tolist()]
    assert documents  # P(none of 16 at share 0.5) = 2^-16
    for r in documents:  # every next token of the text is a target, none of the padding
        length = int((y[r] >= 0).sum())
        assert length > 1 and (y[r, :length - 1] == x[r, 1:length]).all() and (y[r, length:] == -1).all()


def test_replay_is_tinyworld_text_only():
    with pytest.raises(nc.UserError, match="--replay"):
        nc.finalize_args(nc.build_parser().parse_args(["--stage", "mid", "--data", "hf", "--replay", "0.2"]))
    args = nc.build_parser().parse_args(["--stage", "mid", "--data", "hf"])
    nc.finalize_args(args)
    assert args.replay == 0.0
