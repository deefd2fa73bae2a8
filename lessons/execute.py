"""Execute lessons top to bottom and save them with their outputs.

    python lessons/execute.py                      # every lesson
    python lessons/execute.py 06_sft.ipynb         # some

The notebooks run in order in one temporary copy of the code, as tests/test_lessons.py runs them,
so what they train never lands in the checkout: lessons 05-08 continue from the checkpoints the
lessons before them left there (a lesson named alone trains the earlier stages it needs itself).
In the saved outputs the temporary folder reads <checkout>. The saved notebook records a digest of
the code that produced its outputs (the modules a lesson imports, lessons/common.py and
lessons/exercises/, speedrun.sh, which lesson 9 reads, and its own code cells); the test suite
fails when a lesson's saved outputs came from other code, and says to run this script. It also
records how long the lesson took (wall_seconds, rounded), which lessons/README.md's table quotes and
the test suite compares with it.
"""
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
CODE = ("nanochat_one.py", "bpe.py", "tinyworld.py", "sandbox.py", "serve.py", "report.py", "realdata.py", "hardware.py",
        "speedrun.sh")
LESSON_CODE = ("common.py", "exercises")  # what the notebooks import from lessons/


def lesson_code_files():
    """The files of LESSON_CODE under lessons/, in a fixed order."""
    files = []
    for name in LESSON_CODE:
        path = ROOT / "lessons" / name
        files += sorted(path.glob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return files


def code_digest(nb):
    """sha256 of the code files and the notebook's code cells: what its outputs depend on."""
    digest = hashlib.sha256()
    for path in [ROOT / name for name in CODE] + lesson_code_files():  # line endings aside (CRLF checkouts agree)
        digest.update(path.read_bytes().replace(b"\r\n", b"\n"))
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
    return digest.hexdigest()


def prepare(workdir):
    """Copy the code a lesson imports into workdir (once: lessons that run after it in the same
    workdir find the checkpoints the earlier ones left in workdir/lessons/runs/)."""
    if (workdir / "lessons").exists():
        return
    for name in CODE:
        shutil.copy(ROOT / name, workdir / name)
    for built in ROOT.glob("_bpe*.so"):  # an in-place build of the C extension, if there is one
        shutil.copy(built, workdir / built.name)
    (workdir / "lessons").mkdir()
    for name in LESSON_CODE:
        path = ROOT / "lessons" / name
        if path.is_dir():
            shutil.copytree(path, workdir / "lessons" / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy(path, workdir / "lessons" / name)


def execute(notebook, workdir, timeout=3000):
    """Run a notebook top to bottom in a copy of the code under workdir (its lessons/ folder is the
    working directory); return the executed notebook. Raises nbclient's CellExecutionError, with the
    failing cell's traceback, on any error."""
    import nbclient
    prepare(workdir)
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir / "lessons")}}).execute()
    return nb


def main(names):
    paths = [ROOT / "lessons" / name for name in names] or sorted((ROOT / "lessons").glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            sys.exit(f"no lesson {path}: name one of {', '.join(p.name for p in sorted(path.parent.glob('*.ipynb')))}")
    with tempfile.TemporaryDirectory() as tmp:  # one for all: each lesson chains from the ones before it
        for path in paths:
            start = time.time()
            nb = execute(path, Path(tmp))
            seconds = round(time.time() - start)
            nb.metadata["code_digest"] = code_digest(nb)
            nb.metadata["wall_seconds"] = seconds  # lessons/README.md quotes it; tests/test_lessons.py compares
            path.write_text(nbformat.writes(nb).replace(tmp, "<checkout>") + "\n")
            print(f"{path.name}: executed in {seconds} s and saved", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
