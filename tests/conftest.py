import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import nanochat_one as nc  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true",
                     help="also run the slow tests: executing the ten lessons (about 20 minutes on 2 cores)")


def pytest_collection_modifyitems(config, items):
    # the default run checks every module in minutes; `--all` (bash tests/run.sh --all, and CI) adds the rest
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
    """Run one stage in this process as the CLI does (parse, check the flags, seed) and return
    its summary; tests import it: `from conftest import run_stage`."""
    args = nc.build_parser().parse_args(list(argv))
    nc.finalize_args(args)
    torch.manual_seed(args.seed)
    return nc.STAGES[args.stage](args, nc.Dist())


def train_in(folder, *stages):
    """Run stages (each a list of CLI arguments) in this process with NANOCHAT_BASE_DIR=folder, for
    module-wide fixtures; returns folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(folder))
        for argv in stages:
            run_stage(*argv)
    return folder
