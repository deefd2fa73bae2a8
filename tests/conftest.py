import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh artifacts directory for one test."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"
