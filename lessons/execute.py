"""Execute lessons top to bottom and save them with their outputs.

    python lessons/execute.py                      # every lesson
    python lessons/execute.py 06_sft.ipynb         # some

Each notebook runs in a temporary copy of the code, as tests/test_lessons.py runs it, so what it
trains never lands in the checkout (it trains the earlier stages it needs itself) and the kernel
gets one PyTorch thread. In the saved outputs the temporary folder reads <checkout>. The saved
notebook records a digest of the code that produced its outputs (the modules a lesson imports,
speedrun.sh, which lesson 9 reads, and its own code cells); the test suite fails when a lesson's
saved outputs came from other code, and says to run this script.
"""
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
CODE = ("nanochat_one.py", "bpe.py", "tinyworld.py", "sandbox.py", "speedrun.sh")


def code_digest(nb):
    """sha256 of the code files and the notebook's code cells: what its outputs depend on."""
    digest = hashlib.sha256()
    for name in CODE:  # line endings aside, so a checkout with CRLF line endings agrees
        digest.update((ROOT / name).read_bytes().replace(b"\r\n", b"\n"))
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
    return digest.hexdigest()


def execute(notebook, workdir, timeout=300):
    """Run a notebook top to bottom in a copy of the code under workdir (its lessons/ folder is the
    working directory); return the executed notebook. Raises nbclient's CellExecutionError, with the
    failing cell's traceback, on any error."""
    import nbclient
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the kernel: the lesson models gain nothing from more
    for name in CODE:
        shutil.copy(ROOT / name, workdir / name)
    for built in ROOT.glob("_bpe*.so"):  # an in-place build of the C extension, if there is one
        shutil.copy(built, workdir / built.name)
    (workdir / "lessons").mkdir()
    nb = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir / "lessons")}}).execute()
    return nb


def main(names):
    paths = [ROOT / "lessons" / name for name in names] or sorted((ROOT / "lessons").glob("*.ipynb"))
    for path in paths:
        if not path.is_file():
            sys.exit(f"no lesson {path}: name one of {', '.join(p.name for p in sorted(path.parent.glob('*.ipynb')))}")
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            nb = execute(path, Path(tmp))
            nb.metadata["code_digest"] = code_digest(nb)
            path.write_text(nbformat.writes(nb).replace(tmp, "<checkout>") + "\n")
        print(f"{path.name}: executed and saved in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
