"""Execute every lessons/*.ipynb top to bottom; any error in any cell fails the test.

Each notebook runs in a temporary copy of the repository's three modules, speedrun.sh (which lesson 9
reads) and the lessons folder, so its artifacts (lessons/runs/) go to a temporary directory, never
to the checkout. The kernel gets one PyTorch thread: the lesson models are too small to gain from
more, and on a busy machine extra threads mostly wait for each other (a cell can run 10x slower).
Skipped when nbclient (a dev extra) is not installed."""
import shutil
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "lessons").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the kernel process
    for name in ("nanochat_one.py", "bpe.py", "tinyworld.py", "sandbox.py", "speedrun.sh"):
        shutil.copy(ROOT / name, tmp_path / name)
    for built in ROOT.glob("_bpe*.so"):  # an in-place build of the C extension, if there is one
        shutil.copy(built, tmp_path / built.name)
    lessons = tmp_path / "lessons"
    lessons.mkdir()
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(lessons)}})
    client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error
