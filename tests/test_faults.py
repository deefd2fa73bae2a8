"""Bad flags, bad files and failed writes: each ends in one line that says what to do, before any
work starts where it can be known then, and never leaves a run without its last complete checkpoint."""
import dataclasses
import errno
import json
import os
import pathlib
import sys

import pytest
import torch

import nanochat_one as nc
import realdata
from conftest import TINY, TINY_TOK, run_stage


def one_line_error(capsys, *argv):
    """Run the CLI in this process; it must exit with status 2 and one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        nc.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# (flags, words the error must contain): every flag with a bad value, and bad combinations
BAD_FLAGS = [
    (["--stage", "pretrain"], "invalid choice"),
    (["--stage", "base", "--compile", "maybe"], "invalid choice"),
    (["--stage", "eval", "--source", "final"], "invalid choice"),
    (["--stage", "base", "--data", "web"], "invalid choice"),
    (["--stage", "base", "--depth", "four"], "invalid int value"),
    (["--stage", "base", "--lr-scale", "fast"], "invalid float value"),
    (["--stage", "base", "--num-shards", "1"], "--num-shards must be at least 2"),
    (["--stage", "tok", "--vocab-size", "10"], "--vocab-size must be more than 265"),
    (["--stage", "tok", "--tok-chars", "0"], "--tok-chars must be at least 1000"),
    (["--stage", "base", "--depth", "0"], "--depth must be at least 1"),
    (["--stage", "base", "--depth", "-3"], "--depth must be at least 1"),
    (["--stage", "base", "--aspect-ratio", "0"], "--aspect-ratio must be at least 1"),
    (["--stage", "base", "--head-dim", "33"], "--head-dim must be even"),
    (["--stage", "base", "--head-dim", "0"], "--head-dim must be even"),
    (["--stage", "base", "--n-kv-head", "0"], "--n-kv-head must be at least 1"),
    (["--stage", "base", "--max-seq-len", "1"], "--max-seq-len must be at least 2"),
    (["--stage", "base", "--device-batch-size", "0"], "--device-batch-size must be at least 1"),
    (["--stage", "base", "--total-batch-size", "-8192"], "--total-batch-size must be at least 1"),
    (["--stage", "base", "--total-batch-size", "1000"], "must be a multiple of device batch x sequence length"),
    (["--stage", "mid", "--device-batch-size", "3"], "must be a multiple of device batch x sequence length"),
    (["--stage", "base", "--num-iterations", "0"], "--num-iterations must be at least 1, or -1"),
    (["--stage", "base", "--num-iterations", "-2"], "--num-iterations must be at least 1, or -1"),
    (["--stage", "base", "--target-param-data-ratio", "0"], "--target-param-data-ratio must be positive"),
    (["--stage", "base", "--lr-scale", "-1"], "--lr-scale must be positive"),
    (["--stage", "sft", "--lr-scale", "0"], "--lr-scale must be positive"),
    (["--stage", "base", "--lr-scale", "nan"], "--lr-scale must be positive"),
    (["--stage", "base", "--lr-scale", "inf"], "--lr-scale must be positive"),
    (["--stage", "base", "--matrix-lr", "-0.02"], "--matrix-lr must be positive"),
    (["--stage", "base", "--embedding-lr", "0"], "--embedding-lr must be positive"),
    (["--stage", "base", "--smear-lr", "-1"], "--smear-lr must be positive"),
    (["--stage", "base", "--copy-drills", "1"], "--copy-drills must be at least 0 and below 1"),
    (["--stage", "base", "--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    (["--stage", "base", "--warmup-ratio", "1.5"], "--warmup-ratio must be between 0 and 1"),
    (["--stage", "base", "--warmdown-ratio", "-0.2"], "--warmdown-ratio must be between 0 and 1"),
    (["--stage", "base", "--warmup-ratio", "0.5", "--warmdown-ratio", "0.6"], "must be at most 1"),
    (["--stage", "base", "--final-lr-frac", "2"], "--final-lr-frac must be between 0 and 1"),
    (["--stage", "base", "--eval-every", "-1"], "--eval-every must be 0 or more"),
    (["--stage", "base", "--eval-batches", "0"], "--eval-batches must be at least 1"),
    (["--stage", "base", "--save-every", "-5"], "--save-every must be 0 or more"),
    (["--stage", "base", "--log-every", "0"], "--log-every must be at least 1"),
    (["--stage", "rl", "--num-samples", "1"], "--num-samples must be at least 2"),
    (["--stage", "rl", "--prompts-per-step", "0"], "--prompts-per-step must be at least 1"),
    (["--stage", "rl", "--pass-k-problems", "0"], "--pass-k-problems must be at least 1"),
    (["--stage", "rl", "--temperature", "-0.5"], "--temperature must be 0 (greedy) or more"),
    (["--stage", "chat", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--stage", "eval", "--eval-items", "0"], "--eval-items must be at least 1"),
    (["--stage", "eval", "--max-per-task", "0"], "--max-per-task must be at least 1, or -1"),
    (["--stage", "chat", "--top-k", "0"], "--top-k must be at least 1"),
    (["--stage", "eval", "--resume"], "--resume continues a training stage"),
    (["--stage", "eval", "--humaneval"], "--humaneval runs with --stage eval --data hf"),
    (["--stage", "base", "--data", "hf", "--data-dir", "/no/such/folder"], "is not a folder"),
]


@pytest.mark.parametrize("argv, words", BAD_FLAGS, ids=[" ".join(a[1:]) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_any_work(argv, words, base_dir, capsys):
    assert words in one_line_error(capsys, *argv)
    assert not base_dir.exists()  # nothing was written: no tokenizer, no checkpoint, no report


@pytest.fixture
def trained(base_dir):
    """A tokenizer and a 4-step base checkpoint; returns the checkpoint directory."""
    run_stage(*TINY_TOK)
    run_stage("--stage", "base", *TINY, "--num-iterations", "4", "--eval-every", "0")
    return nc.checkpoint_dir("base", "d2")


@pytest.mark.parametrize("name", ["model_000004.pt", "optim_000004.pt"])
def test_checkpoint_truncated_at_any_byte(trained, name, capsys):
    path = trained / name
    data = path.read_bytes()
    for cut in sorted({0, 1, 64, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
        path.write_bytes(data[:cut])
        assert "truncated or corrupt" in one_line_error(capsys, "--stage", "base", *TINY, "--num-iterations", "6",
                                                        "--resume")
    path.write_bytes(data)  # restored, the same checkpoint resumes
    run_stage("--stage", "base", *TINY, "--num-iterations", "6", "--resume", "--eval-every", "0")
    assert nc.last_checkpoint_step(trained) == 6


def test_meta_missing_or_corrupt(trained, capsys):
    meta = trained / "meta_000004.json"
    text = meta.read_text()
    for broken in (text[: len(text) // 2], "{}", json.dumps({"model_config": {"n_layer": "two"}}), ""):
        meta.write_text(broken)
        assert "is unreadable" in one_line_error(capsys, "--stage", "mid", *TINY)
    meta.unlink()
    assert "no base checkpoint" in one_line_error(capsys, "--stage", "mid", *TINY)


def test_tokenizer_from_another_vocabulary(trained, capsys):
    run_stage("--stage", "tok", "--vocab-size", "600", "--tok-chars", "100000")
    assert "was trained with tokenizer" in one_line_error(capsys, "--stage", "mid", *TINY)
    assert "was trained with tokenizer" in one_line_error(capsys, "--stage", "base", *TINY, "--resume")
    nc.tokenizer_path().write_text('{"format": "something else"}')
    assert "tokenizer" in one_line_error(capsys, "--stage", "mid", *TINY)


def write_parquet(path, columns, row_group_size=3):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def parquet_dir(tmp_path, name, train, val):
    folder = tmp_path / name
    folder.mkdir()
    write_parquet(folder / "shard_00000.parquet", train)
    write_parquet(folder / "shard_00001.parquet", val)
    return folder


def test_bad_parquet_shards(tmp_path, base_dir, capsys):
    texts = {"text": [f"document number {i} of the test corpus." * 5 for i in range(40)]}
    def hf(folder, *more):
        return one_line_error(capsys, "--stage", "tok", "--data", "hf", "--data-dir", str(folder), "--tok-chars", "1000", *more)

    assert "hold no documents" in hf(parquet_dir(tmp_path, "empty", {"text": []}, texts))
    assert "no 'text' column" in hf(parquet_dir(tmp_path, "columns", {"content": texts["text"]}, texts))
    truncated = parquet_dir(tmp_path, "truncated", texts, texts)
    shard = truncated / "shard_00000.parquet"
    shard.write_bytes(shard.read_bytes()[:200])
    assert "truncated or not parquet" in hf(truncated)
    one = tmp_path / "one"
    one.mkdir()
    write_parquet(one / "shard_00000.parquet", texts)
    assert "need at least 2" in hf(one)


def test_validation_shard_smaller_than_one_evaluation(tmp_path, base_dir, capsys):
    texts = [f"document number {i} of the test corpus, with some words in it." * 3 for i in range(200)]
    folder = parquet_dir(tmp_path, "data", {"text": texts}, {"text": texts[:3]})
    run_stage("--stage", "tok", "--data", "hf", "--data-dir", str(folder), "--vocab-size", "300", "--tok-chars", "5000")
    line = one_line_error(capsys, "--stage", "base", "--data", "hf", "--data-dir", str(folder), *TINY,
                          "--num-iterations", "3", "--eval-every", "0")
    assert "validation documents ran out" in line
    assert not nc.checkpoint_dir("base", "d2").exists()  # it stopped at the first evaluation, before training


def test_chat_dataset_with_wrong_columns(tmp_path, trained, capsys):
    for name, columns in (("smoltalk", {"messages": [[{"role": "user", "content": "hi"}]]}),
                          ("mmlu", {"question": ["q"], "choices": [["a", "b"]], "answer": [0]}),
                          ("gsm8k", {"question": ["q"], "answer": ["#### 1"]})):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            write_parquet(tmp_path / name / f"{split}.parquet", columns)
    write_parquet(tmp_path / "gsm8k" / "train.parquet", {"problem": ["q"], "solution": ["#### 1"]})
    line = one_line_error(capsys, "--stage", "mid", "--data", "hf", "--data-dir", str(tmp_path), *TINY)
    assert "gsm8k" in line and "question" in line and "answer" in line


def test_full_disk_while_saving_keeps_the_last_checkpoint(trained, monkeypatch, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    line = one_line_error(capsys, "--stage", "base", *TINY, "--num-iterations", "6", "--resume", "--eval-every", "0")
    assert "No space left on device" in line and "the step 4 checkpoint is kept" in line
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before  # untouched, and nothing left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert nc.load_checkpoint("base", "d2", "cpu", with_optimizer=True)[2]["step"] == 4


def test_ctrl_c_during_a_save_keeps_the_last_checkpoint(trained, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def interrupted(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the model file of step 6 is in place; Ctrl-C while the optimizer's is written
            real_save(obj, path, *args, **kwargs)
            raise KeyboardInterrupt
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    line = one_line_error(capsys, "--stage", "base", *TINY, "--num-iterations", "6", "--resume", "--eval-every", "0")
    assert "interrupted" in line and "the last checkpoint (step 4)" in line and "--resume" in line
    assert not [p for p in trained.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert nc.load_checkpoint("base", "d2", "cpu", with_optimizer=True)[2]["step"] == 4
    run_stage("--stage", "base", *TINY, "--num-iterations", "6", "--resume", "--eval-every", "0")
    assert nc.last_checkpoint_step(trained) == 6


def test_real_data_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    """The laptop install leaves out `datasets`; asking for real data then gives one line, not a traceback."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(realdata.DataError, match=r"pip install -e '\.\[hf\]'"):
        realdata.load_rows("gsm8k", "train", str(tmp_path))


def save_tiny_checkpoint(directory, step):
    """A checkpoint of a one-layer model, written by save_checkpoint as a stage writes it (no training)."""
    config = nc.GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = nc.GPT(config)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters())
    nc.save_checkpoint(directory, step, model, [optimizer], dict(step=step, model_config=dataclasses.asdict(config)))
    return model


def test_checkpoint_is_on_disk_before_older_steps_are_deleted(tmp_path, monkeypatch):
    """Power cut safety: each file's bytes are flushed (fsync) before it is renamed into place, the
    folder (which holds the names) after, and only then is an older step deleted; otherwise a power
    cut can leave the new checkpoint empty and the old one gone."""
    directory = tmp_path / "base" / "d1"
    save_tiny_checkpoint(directory, 4)
    events, real_fsync, real_replace, real_unlink = [], os.fsync, os.replace, pathlib.Path.unlink

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(source), str(target)))
        real_replace(source, target)

    def unlink(path, missing_ok=False):
        if path.exists():
            events.append(("unlink", str(path)))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    save_tiny_checkpoint(directory, 6)
    replaces = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert [os.path.basename(events[i][2]) for i in replaces] == ["model_000006.pt", "optim_000006.pt",
                                                                  "meta_000006.json"]
    for i in replaces:
        assert ("fsync", events[i][1]) in events[:i], f"{events[i][1]} was renamed before its bytes were flushed"
        assert ("fsync", str(directory)) in events[i + 1:], f"the rename to {events[i][2]} was never flushed"
    deleted = [i for i, e in enumerate(events) if e[0] == "unlink"]
    assert sorted(os.path.basename(events[i][1]) for i in deleted) == ["meta_000004.json", "model_000004.pt",
                                                                       "optim_000004.pt"]
    last_folder_flush = max(i for i, e in enumerate(events) if e == ("fsync", str(directory)))
    assert replaces[-1] < last_folder_flush < deleted[0]  # the new step is on the disk before the old one goes


def test_checkpoint_cleanup_deletes_only_its_own_files(tmp_path):
    directory = tmp_path / "base" / "d1"
    directory.mkdir(parents=True)
    yours = ["model_final.pt", "meta_best.json", "notes_v2.txt", "optim_old.pt", "model_000004.pt.bak"]
    for name in yours:
        (directory / name).write_text("the user's own file")
    save_tiny_checkpoint(directory, 4)
    save_tiny_checkpoint(directory, 6)
    checkpoint = ["meta_000006.json", "model_000006.pt", "optim_000006.pt"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(yours + checkpoint)


def test_stray_meta_file_is_ignored(tmp_path, monkeypatch):
    """A meta_best.json (or meta_notes.json) of your own beside the checkpoints is not a step."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "runs"))
    directory = nc.checkpoint_dir("base", "d1")
    saved = save_tiny_checkpoint(directory, 4)
    for name in ("meta_best.json", "meta_notes.json", "meta_5.json"):
        (directory / name).write_text("{}")
    assert nc.last_checkpoint_step(directory) == 4
    model, optimizer_states, meta = nc.load_checkpoint("base", "d1", "cpu", with_optimizer=True)
    assert meta["step"] == 4 and len(optimizer_states) == 1
    assert all(torch.equal(w, model.state_dict()[name]) for name, w in saved.state_dict().items())


OUT_OF_MEMORY = [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["MemoryError", "OutOfMemoryError"])
def test_out_of_memory_on_a_good_checkpoint_is_not_called_corrupt(tmp_path, monkeypatch, error):
    saved = save_tiny_checkpoint(tmp_path, 4).state_dict()
    path = tmp_path / "model_000004.pt"
    real_load = torch.load

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(nc.UserError) as info:
        nc.torch_load(path, "cpu")
    message = str(info.value)
    assert "corrupt" not in message and "delete" not in message, message
    assert type(error).__name__ in message and "\n" not in message
    monkeypatch.setattr(torch, "load", real_load)
    loaded = nc.torch_load(path, "cpu")  # the file was good all along
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[name], w) for name, w in saved.items())
    path.write_bytes(path.read_bytes()[:-100])  # a truncated file still is truncated
    with pytest.raises(nc.UserError, match="truncated or corrupt"):
        nc.torch_load(path, "cpu")
