"""CORE (DCLM) and the real chat evaluations, on tiny local files written in the real formats.

The scoring tests use a byte-level tokenizer (no merges, so every character is one token) and a
bigram "model" whose logits come from a hand-set table: after token a it strongly expects b
wherever TABLE[a, b] is set. That forces its answers, so every accuracy below is known exactly:
    multiple choice (delimiter " "): it expects "yes" after a space -> right on 3 of 4 items
    schema (delimiter ""): it expects "!" after "k" -> right on 2 of 3 items
    language modelling (delimiter "="): it expects "7" after "=" -> right on 2 of 3 items
"""
import io
import json
import socket
import types
import zipfile

import pytest
import torch
import torch.nn as nn

import nanochat_one as nc
import realdata
import report
import sandbox
from conftest import TINY, byte_tokenizer, run_stage, tiny_gpt
from test_download import Response

TOKENIZER = byte_tokenizer()  # bytes only: "abc" -> [97, 98, 99]

MC = [dict(query="Is the sky blue?", choices=["yes", "no", "maybe", "never"], gold=0),
      dict(query="Is fire hot?", choices=["no", "yes", "never", "maybe"], gold=1),
      dict(query="Is ice cold?", choices=["maybe", "never", "no", "yes"], gold=3),
      dict(query="Is a stone alive?", choices=["yes", "no", "maybe", "never"], gold=1)]  # the model says yes
SCHEMA = [dict(context_options=["I pick", "I pin"], continuation="!!", gold=0),
          dict(context_options=["we sat", "we ask"], continuation="!!", gold=1),
          dict(context_options=["they walk", "they run"], continuation="!!", gold=1)]  # the model likes "k"
LM = [dict(context="3+4", continuation="7"), dict(context="2+5 ", continuation="7"),
      dict(context="4+4", continuation="8")]  # the model always answers 7
TASKS = [  # (yaml entry, random baseline in percent, items)
    (dict(label="toy_mc", dataset_uri="reasoning/toy_mc.jsonl", num_fewshot=[2], icl_task_type="multiple_choice"), 25, MC),
    (dict(label="toy_schema", dataset_uri="schema/toy_schema.jsonl", num_fewshot=[1], icl_task_type="schema",
          continuation_delimiter=""), 50, SCHEMA),
    (dict(label="toy_lm", dataset_uri="lm/toy_lm.jsonl", num_fewshot=[0], icl_task_type="language_modeling",
          continuation_delimiter="="), 0, LM),
]
# (accuracy, centered): 3/4 -> (0.75 - 0.25) / 0.75; 2/3 -> (2/3 - 1/2) / (1/2); 2/3 -> 2/3
EXPECTED = {"toy_mc": (3 / 4, 2 / 3), "toy_schema": (2 / 3, 1 / 3), "toy_lm": (2 / 3, 2 / 3)}
EXPECTED_CORE = (2 / 3 + 1 / 3 + 2 / 3) / 3


def write_bundle(directory):
    """A bundle in the real layout: core.yaml, eval_meta_data.csv, eval_data/<dataset_uri>."""
    yaml = pytest.importorskip("yaml")
    for spec, _, items in TASKS:
        path = directory / "eval_data" / spec["dataset_uri"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    (directory / "core.yaml").write_text(yaml.safe_dump(dict(icl_tasks=[spec for spec, _, _ in TASKS])))
    (directory / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
        + "".join(f"{spec['label']},toy,{spec['icl_task_type']},0,{len(items)},{baseline},,a toy task\n"
                  for spec, baseline, items in TASKS))
    return directory


class BigramModel(nn.Module):
    """logits[b, t] = TABLE[idx[b, t]]: the next token depends only on the current one."""

    def __init__(self, pairs, sequence_len=256):
        super().__init__()
        self.config = types.SimpleNamespace(sequence_len=sequence_len)
        self.table = torch.zeros(TOKENIZER.vocab_size, TOKENIZER.vocab_size)
        for a, b in pairs:
            self.table[TOKENIZER.encode_ordinary(a)[0], TOKENIZER.encode_ordinary(b)[0]] = 10.0

    def forward(self, idx):
        return self.table[idx]  # (B, T, vocab)


FORCED = BigramModel([(" ", "y"), ("y", "e"), ("e", "s"), ("k", "!"), ("=", "7")])


def core_task(spec, baseline, items):
    return dict(label=spec["label"], type=spec["icl_task_type"], num_fewshot=spec["num_fewshot"][0],
                delimiter=spec.get("continuation_delimiter", " "), random_baseline=baseline / 100, items=items)


def test_core_texts_and_spans_by_hand():
    texts = realdata.core_texts(MC[0], "multiple_choice", " ", fewshot=[MC[1]])
    assert texts[0] == "Is fire hot? yes\n\nIs the sky blue? yes"
    rows, spans = realdata.core_spans(TOKENIZER, texts, "multiple_choice")
    assert [TOKENIZER.decode(row[a:b]) for row, (a, b) in zip(rows, spans)] == ["yes", "no", "maybe", "never"]
    rows, spans = realdata.core_spans(TOKENIZER, realdata.core_texts(SCHEMA[0], "schema", ""), "schema")
    assert [TOKENIZER.decode(row[a:b]) for row, (a, b) in zip(rows, spans)] == ["!!", "!!"]
    texts = realdata.core_texts(LM[1], "language_modeling", "=", fewshot=[LM[0]])
    assert texts == ["3+4=7\n\n2+5=", "3+4=7\n\n2+5=7"]
    (row,), ((a, b),) = realdata.core_spans(TOKENIZER, texts, "language_modeling")
    assert row[0] == TOKENIZER.special_tokens["<|bos|>"] and TOKENIZER.decode(row[a:b]) == "7"
    assert realdata.common_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert realdata.centered_accuracy(0.625, 0.25) == 0.5


@pytest.mark.parametrize("sequence_len", [256, 12])  # 12: the few-shot rows are cropped from the left
def test_each_task_type_scores_the_forced_answers(sequence_len):
    model = BigramModel([(" ", "y"), ("y", "e"), ("e", "s"), ("k", "!"), ("=", "7")], sequence_len)
    for spec, baseline, items in TASKS:
        task = core_task(spec, baseline, items)
        correct, total = nc.evaluate_core_task(model, TOKENIZER, task, items, nc.Dist())
        assert (correct / total) == pytest.approx(EXPECTED[spec["label"]][0]), spec["label"]


def test_fewshot_is_seeded_and_never_the_item_itself():
    data = [dict(query=str(i)) for i in range(20)]
    for index in range(20):
        shots = realdata.core_fewshot(data, index, 5)
        assert len(shots) == 5 and data[index] not in shots
        assert shots == realdata.core_fewshot(data, index, 5)
    assert len(realdata.core_fewshot(data[:3], 0, 10)) == 2  # a cropped task offers fewer examples


def test_two_ranks_add_up_to_one_process():
    # Without a process group all_reduce_counts leaves each rank's counts as they are, so calling
    # the evaluation as rank 0 and as rank 1 of 2 returns the two shares that the all-reduce would
    # sum under torchrun: together they must cover every item once and match one process.
    for spec, baseline, items in TASKS:
        task = core_task(spec, baseline, items)
        one = nc.evaluate_core_task(FORCED, TOKENIZER, task, items, nc.Dist())
        shares = [nc.evaluate_core_task(FORCED, TOKENIZER, task, items, nc.Dist(rank=r, world_size=2)) for r in (0, 1)]
        assert [total for _, total in shares] == [(len(items) + 1) // 2, len(items) // 2]
        assert (sum(c for c, _ in shares), sum(t for _, t in shares)) == one


def test_bundle_reading_and_core_arithmetic(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    tasks = realdata.load_core_bundle(bundle)
    assert [(t["label"], t["num_fewshot"], t["delimiter"], t["random_baseline"]) for t in tasks] == [
        ("toy_mc", 2, " ", 0.25), ("toy_schema", 1, "", 0.5), ("toy_lm", 0, "=", 0.0)]
    assert sorted(map(json.dumps, tasks[0]["items"])) == sorted(map(json.dumps, MC))  # shuffled, all there
    assert [len(t["items"]) for t in realdata.load_core_bundle(bundle, max_per_task=2)] == [2, 2, 2]
    result = nc.evaluate_core(FORCED, TOKENIZER, bundle, nc.Dist())
    for label, (accuracy, centered) in EXPECTED.items():
        assert result["core_tasks"][label]["accuracy"] == pytest.approx(accuracy)
        assert result["core_tasks"][label]["centered"] == pytest.approx(centered)
    assert result["CORE"] == pytest.approx(EXPECTED_CORE)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntoy_mc,25\n")  # two tasks missing
    with pytest.raises(realdata.DataError, match="incomplete or malformed"):
        realdata.load_core_bundle(bundle)


def test_download_retries_unpacks_atomically_and_records_sha256(tmp_path, monkeypatch):
    import hashlib
    import urllib.request
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(write_bundle(tmp_path / "src" / "eval_bundle").rglob("*")):
            z.write(path, path.relative_to(tmp_path / "src"))
    served, calls = archive.getvalue(), []

    def urlopen(url, timeout):
        calls.append(url)
        if len(calls) == 1:
            raise urllib.error.URLError("connection reset")
        return Response(served)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(realdata.time, "sleep", lambda s: None)
    realdata.download_eval_bundle(tmp_path / "runs" / "eval_bundle")
    assert calls == [realdata.EVAL_BUNDLE_URL] * 2
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["eval_bundle"]  # no temporary leftovers
    assert hashlib.sha256(served).hexdigest() in (tmp_path / "runs" / "eval_bundle" / "SOURCE").read_text()
    assert len(realdata.load_core_bundle(tmp_path / "runs" / "eval_bundle")) == 3


def test_missing_bundle_is_one_line_and_offline_download_skips(base_dir, monkeypatch, capsys):
    args = nc.build_parser().parse_args(["--stage", "eval", "--source", "base"])
    assert nc.find_core_bundle(args, nc.Dist()) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("CORE skipped: no eval bundle in") and "--core-bundle DIR" in out[0]

    def offline(directory):
        raise realdata.DataError(f"could not download {realdata.EVAL_BUNDLE_URL} after 5 attempts (no network)")

    monkeypatch.setattr(realdata, "download_eval_bundle", offline)
    args.data = "hf"
    assert nc.find_core_bundle(args, nc.Dist()) is None
    assert "CORE skipped: could not download" in capsys.readouterr().out
    args.core_bundle = str(base_dir / "nowhere")
    with pytest.raises(nc.UserError, match="has no core.yaml"):
        nc.find_core_bundle(args, nc.Dist())


def test_core_end_to_end_on_a_tiny_base_checkpoint(base_dir, tmp_path, capsys):
    bundle = write_bundle(tmp_path / "bundle")
    run_stage("--stage", "tok", "--vocab-size", "300", "--tok-chars", "20000")
    run_stage("--stage", "base", *TINY, "--num-iterations", "3", "--eval-every", "0", "--eval-batches", "1", "--sample-prompts")
    capsys.readouterr()
    results = run_stage("--stage", "eval", "--source", "base", *TINY, "--core-bundle", str(bundle), "--eval-items", "1",
                        "--eval-batches", "1")
    assert "CORE (mean centered accuracy)" in capsys.readouterr().out
    report = json.loads((base_dir / "report" / "eval_base.json").read_text())
    assert report["CORE"] == results["CORE"]
    assert list(report["core_tasks"]) == ["toy_mc", "toy_schema", "toy_lm"]
    assert [row["items"] for row in report["core_tasks"].values()] == [4, 3, 3]
    assert report["CORE"] == pytest.approx(sum(row["centered"] for row in report["core_tasks"].values()) / 3)
    run_stage("--stage", "report", "--report-path", str(tmp_path / "report.md"))
    markdown = (tmp_path / "report.md").read_text()
    assert "## CORE of the base model" in markdown and "| toy_schema | schema | 1 | 3 |" in markdown


# -- real chat tasks: ARC, MMLU, GSM8K (and HumanEval) from local files in the hub's schemas --

ARC = [dict(id="1", question="Which is a liquid?", choices=dict(text=["rock", "water", "wood", "iron"], label=["A", "B", "C", "D"]), answerKey="B"),
       dict(id="2", question="Which is hot?", choices=dict(text=["ice", "snow", "sun"], label=["1", "2", "3"]), answerKey="3")]
MMLU = [dict(question="2 + 2 = ?", subject="math", choices=["3", "4", "5", "6"], answer=1),
        dict(question="Capital of France?", subject="geo", choices=["Paris", "Rome", "Oslo", "Bern"], answer=0),
        dict(question="Opposite of up?", subject="words", choices=["left", "down", "in", "on"], answer=1)]
GSM8K = [dict(question="Ann has 3 apples and buys 4 more. How many now?", answer="3+4=<<3+4=7>>7\n#### 7"),
         dict(question="Tom has 10 pens and gives away 2. How many left?", answer="10-2=<<10-2=8>>8\n#### 8")]


def write_chat_data(directory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for folder, rows in (("arc_easy", ARC), ("arc_challenge", ARC[:1]), ("gsm8k", GSM8K)):
        (directory / folder).mkdir(parents=True)
        (directory / folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "mmlu").mkdir()
    pq.write_table(pa.Table.from_pylist(MMLU), directory / "mmlu" / "test-00000.parquet")
    return directory


def test_chat_items_from_the_hub_schemas():
    assert nc.chat_eval_item("ARC-Easy", ARC[1]) == dict(question="Which is hot?", choices=["ice", "snow", "sun"], answer=2)
    assert nc.chat_eval_item("MMLU", MMLU[0])["answer"] == 1
    assert nc.chat_eval_item("GSM8K", GSM8K[0]) == dict(question=GSM8K[0]["question"], answer="7")


def test_real_chat_evaluation_with_a_missing_dataset(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    data_dir = write_chat_data(tmp_path / "data")
    (data_dir / "arc_challenge" / "test.jsonl").unlink()
    local = datasets.load_dataset

    def no_hub(path, *a, **k):  # local files load as usual; the hub is unreachable
        if path in ("json", "parquet"):
            return local(path, *a, **k)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    args = nc.build_parser().parse_args(["--stage", "eval", "--data", "hf", "--data-dir", str(data_dir), "--max-new-tokens", "8"])
    nc.finalize_args(args)
    result = nc.evaluate_real_chat(args, tiny_gpt(TOKENIZER.vocab_size).eval(), TOKENIZER, nc.Dist())
    out = capsys.readouterr().out
    assert "ARC-Challenge skipped: could not load arc_challenge from the hub (allenai/ai2_arc, config ARC-Challenge, split test" in out
    assert "HumanEval skipped: it runs model-written code; pass --humaneval" in out
    assert {task: row["items"] for task, row in result["chat_tasks"].items()} == {"ARC-Easy": 2, "MMLU": 3, "GSM8K": 2}
    expected = [(row["accuracy"] - chance) / (1 - chance) for row, chance in
                zip(result["chat_tasks"].values(), (0.25, 0.25, 0.0))]
    assert result["ChatCORE"] == pytest.approx(sum(expected) / 3)


def test_sandbox_runs_humaneval_programs_without_network_or_runaway():
    if sandbox.sandbox_problem():
        pytest.skip(f"no sandbox here: {sandbox.sandbox_problem()}")
    item = dict(prompt='import math\n\n\ndef hyp(a, b):\n    """Hypotenuse."""\n',
                test="def check(f):\n    assert f(3, 4) == 5\n", entry_point="hyp")
    assert sandbox.run_sandboxed(sandbox.humaneval_program(item, "    return math.hypot(a, b)\n"))  # the body only
    assert sandbox.run_sandboxed(sandbox.humaneval_program(item, "```python\ndef hyp(a, b):\n    return math.sqrt(a*a + b*b)\n```"))
    assert not sandbox.run_sandboxed(sandbox.humaneval_program(item, "    return a + b\n"))
    assert not sandbox.run_sandboxed("while True:\n    pass\n", timeout_s=1)
    assert not sandbox.run_sandboxed("x = bytearray(4 << 30)\n")
    with socket.socket() as server:  # reachable from here, not from inside the sandbox
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert not sandbox.run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), 2)\n")


def test_report_table_per_stage():
    row = lambda correct: dict(nc.accuracy_stats(correct, 10), centered=0.0)
    reports = dict(eval_sft=dict(chat_tasks={"ARC-Easy": row(5), "GSM8K": row(1)}, ChatCORE=0.2),
                   eval_rl=dict(chat_tasks={"ARC-Easy": row(5), "MMLU": row(3), "GSM8K": row(2)}, ChatCORE=0.25),
                   eval_mid=dict(val_loss=1.0))
    lines = report.real_eval_report_lines(reports)
    assert "| after stage | ARC-Easy | MMLU | GSM8K | ChatCORE |" in lines
    assert "| sft | 50.0% +- 15.8 [23.7, 76.3] (N=10) | - | 10.0% +- 9.5 [1.8, 40.4] (N=10) | 0.2000 |" in lines
    assert ("| rl | 50.0% +- 15.8 [23.7, 76.3] (N=10) | 30.0% +- 14.5 [10.8, 60.3] (N=10) | "
            "20.0% +- 12.6 [5.7, 51.0] (N=10) | 0.2500 |") in lines
    assert not any(line.startswith("| mid") for line in lines)
