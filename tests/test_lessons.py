"""Execute every lessons/*.ipynb top to bottom; any error in any cell fails the test. And every
lesson's saved outputs must come from the current code.

Each notebook runs as lessons/execute.py runs it: in a temporary copy of the repository's modules,
speedrun.sh (which lesson 9 reads) and an empty lessons folder, so its artifacts (lessons/runs/) go to
a temporary directory, never to the checkout. The kernel gets one PyTorch thread: the lesson models
are too small to gain from more, and on a busy machine extra threads mostly wait for each other (a
cell can run 10x slower). Skipped when nbclient (a dev extra) is not installed."""
import importlib.util
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "lessons").glob("*.ipynb"))
spec = importlib.util.spec_from_file_location("execute_lessons", ROOT / "lessons" / "execute.py")
execute_lessons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(execute_lessons)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # execute sets it for the kernel; this restores it afterwards
    execute_lessons.execute(notebook, tmp_path)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_outputs_come_from_the_current_code(notebook):
    nb = nbformat.read(notebook, as_version=4)
    assert nb.metadata.get("code_digest") == execute_lessons.code_digest(nb), (
        f"{notebook.name}'s saved outputs were produced by other code than the current files: "
        f"run `python lessons/execute.py {notebook.name}` and commit the result")


def test_a_changed_module_or_code_cell_makes_the_outputs_stale(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    before = execute_lessons.code_digest(nb)
    nb.cells[[c.cell_type for c in nb.cells].index("code")].source += "\n"
    assert execute_lessons.code_digest(nb) != before
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    for name in execute_lessons.CODE:
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    monkeypatch.setattr(execute_lessons, "ROOT", tmp_path)
    assert execute_lessons.code_digest(nb) == before
    with open(tmp_path / "tinyworld.py", "a") as f:
        f.write("\n")
    assert execute_lessons.code_digest(nb) != before
