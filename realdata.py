"""
The real datasets, for --data hf: FineWeb-EDU parquet shards for pretraining; SmolTalk, MMLU and
GSM8K for mid-training and SFT; GSM8K for RL; ARC, MMLU, GSM8K, HumanEval and the DCLM eval bundle
(CORE) for evaluation, with the CORE tasks' texts; and your own .jsonl files (conversations, RL
problems). Each comes from a local folder in the hub's schemas (--data-dir) or from
the network: the shards and the bundle by plain HTTPS downloads with retries, the rest through HF
`datasets`, imported only here and only when used (pip install -e '.[hf]').

The embedded default, TinyWorld, is tinyworld.py. This module imports nothing from
nanochat_one.py; what the user can fix (a missing file, no network, a wrong schema) raises
DataError, which nanochat_one.py prints as one line.
"""
import importlib
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import tinyworld


class DataError(Exception):
    """Data that is missing, unreachable or malformed (real datasets, your own files, your reward
    module); the message says what to do."""


def require(name):
    """datasets, pyarrow.parquet or yaml: heavy, and only real data needs them (pip install -e '.[hf]')."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"real data needs the `datasets` package ({name} is missing): pip install -e '.[hf]'") from None


def parquet_documents(data_dir, split, start=0, rank=0, world_size=1):
    """Yield (position, text) from parquet shards: every shard but the last is train, the last
    is val (and test). Position counts documents, so a stream can restart at any document.
    With several ranks, each reads only its own row groups (every world_size-th)."""
    pq = require("pyarrow.parquet")
    files = sorted(Path(data_dir).glob("*.parquet"))
    if len(files) < 2:
        raise DataError(f"found {len(files)} parquet files in {data_dir}: need at least 2 "
                        "(the last one is the validation shard); pass --data-dir with FineWeb-EDU style shards")
    files = files[:-1] if split == "train" else files[-1:]
    position = group_index = 0
    while True:  # loop over the shards forever (epochs)
        owned = 0
        for path in files:
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                raise DataError(f"cannot read parquet shard {path} ({type(e).__name__}: truncated or not parquet); "
                                "delete it (a download fetches it again) or replace it") from None
            if "text" not in pf.schema_arrow.names:
                raise DataError(f"parquet shard {path} has no 'text' column (it has: {', '.join(pf.schema_arrow.names)}); "
                                "base data needs FineWeb-EDU style shards with the documents in 'text'")
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                mine, group_index = group_index % world_size == rank, group_index + 1
                owned += mine
                if not mine or position + n <= start:
                    position += n  # skip the whole row group without reading it
                    continue
                for text in pf.read_row_group(group, columns=["text"]).column("text").to_pylist():
                    if position >= start:
                        yield position, text
                    position += 1
        if position == 0:
            raise DataError(f"the {split} parquet shards in {data_dir} hold no documents")
        if not owned:
            raise DataError(f"the {split} parquet shards in {data_dir} have {group_index} row groups, too few for "
                            f"{world_size} ranks to have one each: use fewer processes or more shards")
        if split != "train":
            return


FINEWEB_SHARD_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
FINEWEB_VAL_SHARD = 1822  # the dataset's last shard: always the validation shard




def download(url, path, attempts=5, first_wait_s=1.0, hint=""):
    """Download url to path, retrying a failed request after 1, 2, 4, 8 s (exponential backoff).
    The bytes go to a temporary name that is renamed to path when complete (as many bytes as the
    server announced, when it announces a length), so an interrupted download never leaves a
    truncated file. hint ends the error after the last attempt."""
    import http.client  # the standard library is enough for plain HTTPS downloads
    import urllib.request
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
                # a connection closed early ends the body as a complete one does: only the announced length tells
                announced = response.headers.get("Content-Length", "")
                if announced.isascii() and announced.isdigit() and f.tell() != int(announced):  # "²".isdigit()
                    raise ConnectionError(f"the connection closed after {f.tell()} of {announced} bytes")
            os.replace(tmp, path)
            return
        # URLError, HTTPError, timeouts and dropped connections are OSErrors; a chunked body cut short is
        # an http.client.IncompleteRead, which is not
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
        finally:
            tmp.unlink(missing_ok=True)  # after a failure of any kind (Ctrl-C too), no partial file stays
        if attempt == attempts - 1:
            raise DataError(f"could not download {url} after {attempts} attempts ({reason}){hint}") from None
        wait = first_wait_s * 2 ** attempt
        print(f"download of {path.name} failed ({reason}); retrying in {wait:.0f}s", flush=True)
        time.sleep(wait)


def download_shards(directory, num_shards, url=FINEWEB_SHARD_URL, val_shard=FINEWEB_VAL_SHARD, attempts=5, first_wait_s=1.0):
    """Download training shards 0 .. num_shards-2 and the validation shard into directory; shards
    already there are skipped. The validation shard is pinned to the dataset's last one, so runs
    with any number of shards validate on the same text; its name also sorts last, which is how
    parquet_documents finds it."""
    if num_shards < 2:
        raise DataError(f"--num-shards must be at least 2 (training shards + the validation shard), got {num_shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    indices = list(range(min(num_shards - 1, val_shard))) + [val_shard]
    missing = [i for i in indices if not (directory / f"shard_{i:05d}.parquet").exists()]
    for n, index in enumerate(missing, 1):
        path = directory / f"shard_{index:05d}.parquet"
        download(url.format(index=index), path, attempts, first_wait_s, hint="; to train without network, put "
                 "FineWeb-EDU style parquet shards (a `text` column; the last file by name is the validation shard) "
                 "in a folder and pass --data-dir FOLDER")
        print(f"downloaded {path} ({n}/{len(missing)})", flush=True)


# Chat data: SmolTalk conversations, MMLU, ARC and GSM8K for mid-training and SFT; GSM8K for RL;
# ARC, MMLU, GSM8K and HumanEval test sets for evaluation. Each is read from a local folder
# (--data-dir with smoltalk/, mmlu/, ... holding train*/test* parquet or jsonl files in the hub's
# schemas) or from the hub. Multiple-choice and GSM8K rows become conversations in the same forms
# as TinyWorld's multiple choice and word problems.

SOURCES = {  # name (= folder under --data-dir) -> (hub path, config, hub split for "train", for "test", columns)
    "smoltalk": ("HuggingFaceTB/smol-smoltalk", None, "train", "test", ["messages"]),
    "mmlu": ("cais/mmlu", "all", "auxiliary_train", "test", ["question", "choices", "answer"]),
    "gsm8k": ("openai/gsm8k", "main", "train", "test", ["question", "answer"]),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "train", "test", ["question", "choices", "answerKey"]),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "train", "test", ["question", "choices", "answerKey"]),
    "humaneval": ("openai/openai_humaneval", None, None, "test", ["prompt", "test", "entry_point"]),
}


def load_rows(name, split, data_dir):
    """The rows of one source's "train" or "test" split: from train*/test* files (parquet or jsonl)
    in <data_dir>/<name>/, else from the hub; checked for the columns the converters read.
    MMLU's auxiliary train set comes in two schemas: flat, or each row wrapped in a "train" field
    (the hub's "auxiliary_train" config); both are read."""
    datasets = require("datasets")
    path, config, train_split, test_split, columns = SOURCES[name]
    local = Path(data_dir or ".") / name
    files = sorted(local.glob(f"{split}*.parquet")) + sorted(local.glob(f"{split}*.jsonl")) if local.is_dir() else []
    if files:
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        rows = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    else:
        hub_split = train_split if split == "train" else test_split
        try:
            rows = datasets.load_dataset(path, config, split=hub_split)
        except Exception as e:
            raise DataError(f"could not load {name} from the hub ({path}, config {config}, split {hub_split}: {type(e).__name__}); "
                            f"for offline use put {split}*.parquet or {split}*.jsonl files in {local}/") from None
    if "train" in rows.column_names and "question" not in rows.column_names:  # MMLU's wrapped rows
        rows = rows.map(lambda row: row["train"], remove_columns=["train"])
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise DataError(f"the {name} {split} data has no column {', '.join(missing)} (it has: {', '.join(rows.column_names)}); "
                        f"{name} rows need {', '.join(columns)}, as on the hub")
    return rows


def answer_index(row):
    """The index of the right choice: MMLU gives it, ARC names it by its label ("B", or "2" in a few rows)."""
    return row["answer"] if "answer" in row else list(row["choices"]["label"]).index(row["answerKey"])


def conversation(name, row):
    """One training row of a chat source as a conversation."""
    if name == "smoltalk":
        return dict(messages=row["messages"])
    if name == "gsm8k":
        return tinyworld.word_problem_conversation(row["question"], row["answer"])
    choices = row["choices"] if name == "mmlu" else row["choices"]["text"]
    return tinyworld.multiple_choice_conversation(row["question"], choices, answer_index(row))


# The mixtures, as nanochat's mid-training and SFT (without its identity and spelling tasks):
# stage -> split -> {source: rows used (None: all)}. Mid: SmolTalk (460K conversations), MMLU
# auxiliary train (100K) and GSM8K (7.5K), validated on their test splits (MMLU's and GSM8K's cut
# to keep the training proportions); SFT: ARC-Easy, ARC-Challenge, GSM8K and 10K SmolTalk rows,
# validated on SmolTalk's test split.
HUB_ROWS = dict(smoltalk=460_000, mmlu=99_842, gsm8k=7_473, arc_easy=2_251, arc_challenge=1_119)  # train rows (SmolTalk's rounded)
MIXTURES = dict(
    mid=dict(train=dict(smoltalk=None, mmlu=None, gsm8k=None), test=dict(smoltalk=None, mmlu=5200, gsm8k=420)),
    sft=dict(train=dict(arc_easy=None, arc_challenge=None, gsm8k=None, smoltalk=10_000), test=dict(smoltalk=None)),
)


def mixture(data_dir, split, stage):
    """The stage's mixture for split "train" (any other: its test splits): (sources, order), sources
    a list of (name, rows) and order one epoch of (source index, row index) pairs, every row used
    once, shuffled with a fixed seed."""
    split = "train" if split == "train" else "test"
    sources = [(name, load_rows(name, split, data_dir), n) for name, n in MIXTURES[stage][split].items()]
    order = [(i, j) for i, (_, rows, n) in enumerate(sources) for j in range(min(len(rows), n or len(rows)))]
    random.Random(42).shuffle(order)
    return [(name, rows) for name, rows, _ in sources], order


def chat_examples(data_dir, split, start=0, stage="mid"):
    """Yield (position, conversation) forever, epoch after epoch of the stage's mixture: each
    stretch of the stream (and each rank's share, taken by position) holds the sources in proportion."""
    sources, order = mixture(data_dir, split, stage)
    for position in itertools.count(start):
        i, j = order[position % len(order)]
        yield position, dict(key=str(position), **conversation(sources[i][0], sources[i][1][j]))


CHAT_EVAL_TASKS = {  # task -> (source, chance accuracy)
    "ARC-Easy": ("arc_easy", 0.25),
    "ARC-Challenge": ("arc_challenge", 0.25),
    "MMLU": ("mmlu", 0.25),
    "GSM8K": ("gsm8k", 0.0),
    "HumanEval": ("humaneval", 0.0),
}


EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def load_core_bundle(directory, max_per_task=-1):
    """The tasks of a DCLM eval bundle, as dicts (label, type, num_fewshot, delimiter,
    random_baseline as a fraction, items). The bundle's layout:
        core.yaml              icl_tasks: [{label, dataset_uri, num_fewshot: [n], icl_task_type,
                               continuation_delimiter (default " ")}, ...]
        eval_meta_data.csv     one row per task: "Eval Task", "Random baseline" (in percent), ...
        eval_data/<dataset_uri> one item per line (fields by type: see core_texts)
    Items are shuffled with a fixed seed, since some files are sorted, then cut to max_per_task."""
    import csv
    yaml = require("yaml")  # PyYAML comes with `datasets`
    directory = Path(directory)
    try:
        config = yaml.safe_load((directory / "core.yaml").read_text(encoding="utf-8"))
        with open(directory / "eval_meta_data.csv", newline="", encoding="utf-8") as f:
            baselines = {row["Eval Task"]: row["Random baseline"] for row in csv.DictReader(f)}  # percent, as text
        tasks = []
        for spec in config["icl_tasks"]:
            shots = spec.get("num_fewshot", 0)
            lines = (directory / "eval_data" / spec["dataset_uri"]).read_text(encoding="utf-8").splitlines()
            items = [json.loads(line) for line in lines if line.strip()]
            random.Random(1337).shuffle(items)
            tasks.append(dict(label=spec["label"], type=spec["icl_task_type"],
                              num_fewshot=shots[0] if isinstance(shots, list) else shots,
                              delimiter=spec.get("continuation_delimiter", " "),
                              random_baseline=float(baselines[spec["label"]]) / 100,
                              items=items[:max_per_task] if max_per_task > 0 else items))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"the CORE bundle in {directory} is incomplete or malformed ({type(e).__name__}: {e}); "
                        f"expected core.yaml, eval_meta_data.csv and eval_data/ as in {EVAL_BUNDLE_URL}") from None
    return tasks


def download_eval_bundle(directory, url=EVAL_BUNDLE_URL, attempts=5, first_wait_s=1.0):
    """Download the zipped bundle and unpack it as `directory` (download() retries). The archive is
    unpacked into a temporary folder that is renamed into place when complete, so an interrupted
    run leaves no half bundle.
    The archive's sha256 is kept in <directory>/SOURCE for the record (there is no published one)."""
    import hashlib
    import tempfile
    import zipfile
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    archive = directory.with_name(f".{directory.name}.zip")
    download(url, archive, attempts, first_wait_s)
    try:
        sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
        with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            found = next(Path(tmp).rglob("core.yaml"), None)
            if found is None:
                raise DataError(f"{url} holds no core.yaml: not an eval bundle")
            (found.parent / "SOURCE").write_text(f"{url}\nsha256 {sha256}\n")
            os.replace(found.parent, directory)
    except zipfile.BadZipFile:
        raise DataError(f"{url} did not give a valid zip archive") from None
    finally:
        archive.unlink(missing_ok=True)
    print(f"downloaded the eval bundle into {directory} (sha256 {sha256})", flush=True)


def read_jsonl(path, read, expected):
    """read(row) of each JSON line of a UTF-8 file, blank lines skipped; a bad line stops everything at
    once with its file and line number. Lines are decoded one by one, so text in another encoding
    (a Latin-1 "café") is reported at its line too."""
    rows = []
    for line_number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        where = f"{path}, line {line_number}"
        try:
            text = line.decode("utf-8")
            if text.strip():
                row = json.loads(text)
                # JSON can spell half of a UTF-16 pair ("\ud800"), which no text holds: caught here, not when
                # the text is first encoded (hashed, tokenized) far from its line
                json.dumps(row, ensure_ascii=False).encode("utf-8")
                rows.append(read(row))
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e}); save the file as UTF-8") from None
        except UnicodeEncodeError as e:  # in UTF-8, only half of a surrogate pair fails to encode
            raise DataError(f"{where}: \\u{ord(e.object[e.start]):04x} is half of a UTF-16 surrogate pair, not a "
                            "character; write the character itself, or both halves of its pair") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: {type(e).__name__}: {e}; each line must be {expected}") from None
    return rows


def own_problems(path):
    """--problems: one {"question": ..., "answer": ...} per line. Split by a hash of the question:
    one in ten held out for pass@k, the rest for training. Returns (train, held_out)."""
    splits = ([], [])
    for problem in read_jsonl(path, lambda row: dict(question=str(row["question"]), answer=str(row["answer"])),
                              '{"question": "...", "answer": "..."}'):
        splits[zlib.crc32(problem["question"].encode()) % 10 == 0].append(problem)
    if not all(splits):
        raise DataError(f"--problems {path}: {len(splits[0])} training and {len(splits[1])} held-out problems (one in ten is "
                        "held out, by a hash of its question); it needs at least one of each: add problems")
    return splits


def core_texts(item, task_type, delimiter, fewshot=()):
    """The texts one CORE item is scored on, after its few-shot examples (each solved and
    followed by a blank line). With delimiter " " and no shots:
        multiple_choice   {"query": "Sky is", "choices": ["blue", "red"], "gold": 0} -> ["Sky is blue", "Sky is red"]
        schema            {"context_options": ["A cat", "A fish"], "continuation": "purrs", "gold": 0}
                          -> ["A cat purrs", "A fish purrs"]
        language_modeling {"context": "One, two,", "continuation": "three"} -> ["One, two,", "One, two, three"]
    (the first text of language_modeling marks where the continuation starts; it is stripped,
    since a trailing space would belong to the continuation's first token)."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise DataError(f"unknown CORE task type {task_type!r} (expected multiple_choice, schema or language_modeling)")


def common_prefix_length(sequences):
    """[[1, 2, 3], [1, 2, 4, 5]] -> 2"""
    columns = list(zip(*sequences))  # one tuple per position that every sequence reaches
    return next((i for i, column in enumerate(columns) if any(token != column[0] for token in column)), len(columns))


def core_spans(tokenizer, texts, task_type):
    """Token rows (BOS first) to forward, and in each the [start, end) span whose loss decides.
    The texts are tokenized whole, as the model reads them; the span is what differs between the
    rows: the answers after the common prefix (multiple_choice), the shared continuation, i.e. the
    common suffix (schema), or what the second text adds to the first (language_modeling, whose
    first row is only that marker and is not forwarded). Every span keeps at least one token."""
    bos = tokenizer.special_tokens["<|bos|>"]
    rows = [[bos] + tokenizer.encode_ordinary(text) for text in texts]
    if task_type == "schema":
        n = min(common_prefix_length([row[::-1] for row in rows]), min(len(row) for row in rows) - 1)
        return rows, [(len(row) - n, len(row)) for row in rows]
    start = common_prefix_length(rows)
    if task_type == "language_modeling":
        rows = rows[1:]
    start = min(start, min(len(row) for row in rows) - 1)
    return rows, [(start, len(row)) for row in rows]


def core_fewshot(data, index, num_fewshot):
    """num_fewshot examples for item `index`, drawn with a fixed seed per item, never the item itself."""
    others = [i for i in range(len(data)) if i != index]
    return [data[i] for i in random.Random(1234 + index).sample(others, min(num_fewshot, len(others)))]


def centered_accuracy(accuracy, baseline):
    """0 at chance, 1 when perfect: centered_accuracy(0.625, 0.25) -> 0.5"""
    return (accuracy - baseline) / (1 - baseline)


def load_reward(spec):
    """--reward module:function: a function (question, reply, answer) -> float from your own module
    (importable from the current folder) that replaces nanochat_one's correct_answer_reward."""
    module_name, _, function_name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"--reward {spec}: {type(e).__name__}: {e}; give module:function, the module a .py file "
                        "in the current folder or installed") from None

    def reward(question, reply, answer):
        value = function(question, reply, answer)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"--reward {spec} returned {value!r} for the question {question[:60]!r}: it must return a finite number")
        return float(value)

    return reward
