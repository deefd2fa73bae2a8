"""Execute every lessons/*.ipynb top to bottom; any error in any cell fails the test. Every lesson's
saved outputs must come from the current code, and every "Try it" exercise's solution must pass its
check (and a wrong answer must fail it).

The notebooks run in order, as lessons/execute.py runs them: in one temporary copy of the
repository's modules, speedrun.sh (which lesson 9 reads) and the lessons' own modules, so their
artifacts (lessons/runs/) go to a temporary directory, never to the checkout, and lessons 05-08
continue from the checkpoints of the lessons before them (one selected alone trains what it needs).
The wall times that lessons/README.md quotes must be the ones the saved notebooks recorded.
Skipped when nbclient (a dev extra) is not installed."""
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "lessons").glob("*.ipynb"))
EXERCISES = sorted(p.stem for p in (ROOT / "lessons" / "exercises").glob("l*.py"))
README = ROOT / "lessons" / "README.md"
spec = importlib.util.spec_from_file_location("execute_lessons", ROOT / "lessons" / "execute.py")
execute_lessons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(execute_lessons)


@pytest.fixture(scope="module")
def lessons_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lessons")


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------------
# The wall times in lessons/README.md's table: lessons/execute.py saves each lesson's in its metadata
# (wall_seconds), and the table must quote that figure. The same code re-executed on the same machine
# takes a few percent more or less, so a figure within 10% (or 2 s, for the lessons of a few seconds)
# stands; one from other code, another machine or a lesson run with the stages before it is further off.

WALL_TIME_TOLERANCE = 0.10  # relative; and at least 2 s


def readme_wall_times(text):
    """The "wall time" column of the table of lessons in a lessons/README.md: {row: seconds}, where a row is
    a notebook's name (its first cell, `04_base_pretraining.ipynb`) or "in all" (the total row), and the
    seconds are None while the figure is a FILL marker. The column is found by its header and counted
    from the end of the row, so a `|` in a description does not shift it; a figure reads "209 s"."""
    column, times = None, {}
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            column = None  # the table ended
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        headers = [cell.lower() for cell in cells]
        if "wall time" in headers:
            column = headers.index("wall time") - len(cells)
            continue
        first = cells[0].strip("*` ")
        first = "in all" if first.lower() == "in all" else first
        if column is None or not (re.fullmatch(r"\d\d_\w+\.ipynb", first) or first == "in all"):
            continue  # the separator row, or another table
        figure = cells[column]
        if "FILL" in figure:
            times[first] = None
        elif match := re.fullmatch(r"(\d+) s", figure):
            times[first] = int(match[1])
        else:
            raise ValueError(f"cannot read {first}'s wall time {figure!r}: write it as seconds, such as 209 s")
    return times


def wall_time_problem(name, quoted, saved):
    """None when the README's figure (quoted: seconds, None for a FILL marker) agrees with the saved
    one (saved: the notebook's wall_seconds); else what is wrong and how to fix it."""
    if quoted is None:
        return f"lessons/README.md's wall time of {name} is still a FILL marker: its saved run took {saved} s"
    if abs(quoted - saved) > max(2, WALL_TIME_TOLERANCE * saved):
        return (f"lessons/README.md says {name} takes {quoted} s, but the run that saved its outputs took "
                f"{saved} s (its metadata's wall_seconds): write {saved} s")
    return None


def check_wall_time(readme, notebook):
    """Fail when the README quotes another wall time for the notebook than it saved; skip, saying so, when
    the notebook has saved none yet."""
    quoted = readme_wall_times(readme.read_text())
    assert notebook.name in quoted, f"{readme}'s table of lessons has no row for {notebook.name}"
    saved = nbformat.read(notebook, as_version=4).metadata.get("wall_seconds")
    if saved is None:
        pytest.skip(f"{notebook.name} has no wall_seconds in its metadata yet: "
                    f"`python lessons/execute.py` records it when it saves the lesson")
    problem = wall_time_problem(notebook.name, quoted[notebook.name], saved)
    assert problem is None, problem


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_readme_quotes_the_saved_wall_time(notebook):
    check_wall_time(README, notebook)


def test_readme_total_wall_time_is_the_sum():
    quoted = readme_wall_times(README.read_text())
    lessons = [quoted.get(p.name) for p in NOTEBOOKS]
    if None in lessons or quoted.get("in all") is None:
        pytest.skip("lessons/README.md's wall times are not all filled in yet")
    assert quoted["in all"] == sum(lessons), (
        f"lessons/README.md's total wall time is {quoted['in all']} s; its lessons add up to {sum(lessons)} s")


def test_a_wrong_wall_time_fails_and_a_missing_one_skips(tmp_path):
    notebook = tmp_path / "04_base_pretraining.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.metadata["wall_seconds"] = 200
    nbformat.write(nb, notebook)
    readme = tmp_path / "README.md"

    def table(figure):
        return ("Some text.\n\n| notebook | what it shows | wall time |\n|---|---|---|\n"
                f"| `00_overview.ipynb` | a picture | 4 s |\n"
                f"| `04_base_pretraining.ipynb` | packing (a `|` here), the base stage | {figure} |\n"
                f"| **In all** | | 204 s |\n\n"
                "| another table | seconds |\n|---|---|\n| `04_base_pretraining.ipynb` | 1 s |\n")

    assert readme_wall_times(table("200 s")) == {"00_overview.ipynb": 4, "04_base_pretraining.ipynb": 200,
                                                 "in all": 204}
    for right in ("200 s", "185 s", "220 s"):
        readme.write_text(table(right))
        check_wall_time(readme, notebook)
    for wrong in ("149 s", "221 s", "<!-- FILL: wall time -->"):
        readme.write_text(table(wrong))
        with pytest.raises(AssertionError, match="04_base_pretraining"):
            check_wall_time(readme, notebook)
    readme.write_text(table("about 3 minutes"))
    with pytest.raises(ValueError, match="as seconds"):
        check_wall_time(readme, notebook)
    del nb.metadata["wall_seconds"]
    nbformat.write(nb, notebook)
    readme.write_text(table("200 s"))
    with pytest.raises(pytest.skip.Exception, match="no wall_seconds"):
        check_wall_time(readme, notebook)
