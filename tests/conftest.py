import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the suite runs its stages on the CPU whatever the machine has (the CUDA tests pick the GPU
# themselves); NANOCHAT_DEVICE=cuda runs them on a GPU instead
os.environ.setdefault("NANOCHAT_DEVICE", "cpu")
import bpe  # noqa: E402
import nanochat_one as nc  # noqa: E402
import tinyworld  # noqa: E402

# The tiny model and run that the end-to-end tests train through the CLI (tests import them:
# `from conftest import TINY, TINY_TOK`): 2 layers, 64 wide (2 heads of 32), a 64-token context, 1024 tokens
# a step (8 rows x 64 tokens x 2 micro-steps), and the tokenizer those runs start from.
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
        "--device-batch-size", "8", "--total-batch-size", "1024", "--eval-batches", "2", "--log-every", "100"]
TINY_TOK = ["--stage", "tok", "--vocab-size", "512", "--tok-chars", "100000"]


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="also run the slow tests: executing the ten lessons (about 20 minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    # the default run checks every module in minutes; `--all` (bash tests/run.sh --all) adds the rest (CI: the
    # lessons that train nothing)
    if not config.getoption("--all"):
        skip = pytest.mark.skip(reason="slow: executes a lesson; run with --all (bash tests/run.sh --all)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh artifacts directory for one test."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def run_stage(*argv):
    """Run one stage in this process as the CLI does (nc.run: parse, check the flags, seed) and
    return its summary; tests import it: `from conftest import run_stage`."""
    return nc.run(list(argv))


def cli_args(*argv):
    """The flags as the CLI reads them, checked and completed by finalize_args (defaults per stage,
    the model tag): for tests that call a stage's helpers with them."""
    parser = nc.build_parser()
    args = parser.parse_args(list(argv))
    nc.finalize_args(args, parser)
    return args


def train_in(folder, *stages):
    """Run stages (each a list of CLI arguments) in this process with NANOCHAT_BASE_DIR=folder, for
    module-wide fixtures; returns folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(folder))
        for argv in stages:
            run_stage(*argv)
    return folder


def tiny_gpt(vocab_size, sequence_len=64, seed=0):
    """A one-layer GPT, 32 wide (2 heads of 16), built and initialised after torch.manual_seed(seed):
    the small model that the unit tests of the engine, evaluations, RL and optimizers run."""
    torch.manual_seed(seed)
    model = nc.GPT(nc.GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                                n_embd=32))
    model.init_weights()
    return model


def tiny_chat_model(tok, seed=0):
    """tiny_gpt for tok's vocabulary, in eval mode, with its (tied) head near uniform but not exactly."""
    model = tiny_gpt(tok.vocab_size, seed=seed)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.1)
    return model.eval()


def byte_tokenizer():
    """A tokenizer with no merges: one token per byte ("abc" -> [97, 98, 99]) and the special tokens."""
    return bpe.Tokenizer([], special_tokens=nc.SPECIAL_TOKENS)


def hello_tokenizer():
    """A tokenizer trained on "hello world" (vocab size 300), for tests that need one but not its merges."""
    return bpe.Tokenizer.train(["hello world"], 300, special_tokens=nc.SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def tok():
    """A 600-token tokenizer trained on 200 TinyWorld documents, for the rendering, engine, chat
    evaluation and loader tests (test_bpe.py, test_rl.py and test_stats.py define their own `tok`)."""
    text = " ".join(tinyworld.tinyworld_document(random.Random(i)) for i in range(200))
    return bpe.Tokenizer.train([text], 600, special_tokens=nc.SPECIAL_TOKENS)
