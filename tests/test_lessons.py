"""Execute every lessons/*.ipynb top to bottom; any error in any cell fails the test. Every lesson's
saved outputs must come from the current code, and every "Try it" exercise's solution must pass its
check (and a wrong answer must fail it).

The notebooks run in order, as lessons/execute.py runs them: in one temporary copy of the
repository's modules, speedrun.sh (which lesson 9 reads) and the lessons' own modules, so their
artifacts (lessons/runs/) go to a temporary directory, never to the checkout, and lessons 05-08
continue from the checkpoints of the lessons before them (one selected alone trains what it needs).
Skipped when nbclient (a dev extra) is not installed."""
import importlib
import importlib.util
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "lessons").glob("*.ipynb"))
EXERCISES = sorted(p.stem for p in (ROOT / "lessons" / "exercises").glob("l*.py"))
spec = importlib.util.spec_from_file_location("execute_lessons", ROOT / "lessons" / "execute.py")
execute_lessons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(execute_lessons)


@pytest.fixture(scope="module")
def lessons_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lessons")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs(notebook, lessons_workdir):
    execute_lessons.execute(notebook, lessons_workdir)


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
    for path in execute_lessons.lesson_code_files():
        copy = tmp_path / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(path.read_bytes())
    monkeypatch.setattr(execute_lessons, "ROOT", tmp_path)
    assert execute_lessons.code_digest(nb) == before
    with open(tmp_path / "tinyworld.py", "a") as f:
        f.write("\n")
    assert execute_lessons.code_digest(nb) != before


@pytest.mark.parametrize("lesson", EXERCISES)
def test_exercise_solutions_pass_their_checks_and_wrong_answers_fail(lesson, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "lessons"))
    checks = importlib.import_module(f"exercises.{lesson}")
    solutions = importlib.import_module(f"solutions.{lesson}")
    exercises = {name: f for name, f in vars(checks).items() if getattr(f, "is_exercise", False)}
    assert exercises, f"lessons/exercises/{lesson}.py defines no exercise"
    assert set(solutions.WRONG) == set(exercises), "every exercise needs one wrong answer in WRONG"
    for name, check in exercises.items():
        check(getattr(solutions, name))
        assert check.outcome == "correct" and f"{name}: correct" in capsys.readouterr().out, name
        check(lambda *args, **kwargs: None)
        assert check.outcome == "not attempted" and "not attempted yet" in capsys.readouterr().out, name
        with pytest.raises(AssertionError):
            check(solutions.WRONG[name])
