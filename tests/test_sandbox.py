"""The HumanEval sandbox against hostile programs, each checked from outside after its run.

Each hostile program exits with status 0 only when it ran and every attempt failed inside, so
run_sandboxed(...) is True for a contained attack; the test then checks the machine from outside:
files unchanged, processes alive, the listener untouched, nothing left running, time within the
limit. The bombs first try one fork (one thread) and stop if it works, so a broken sandbox fails
the test instead of running a bomb on the machine.
"""
import ctypes
import errno
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nanochat_one as nc
import sandbox
from conftest import byte_tokenizer

PROBLEM = sandbox.sandbox_problem()
needs_sandbox = pytest.mark.skipif(PROBLEM is not None, reason=f"no HumanEval sandbox here: {PROBLEM}")


def sandboxed_pythons():
    """Host PIDs of sandboxed programs still alive: our interpreter reading its code from stdin
    (`python -I -`) as PID 1 of a nested PID namespace, not yet a zombie."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "Z")
        if command[1:3] == [b"-I", b"-"] and len(nspid) > 1 and nspid[-1] == "1" and state not in "ZX":
            found.add(int(pid))
    return found


def run_timed(program, **limits):
    start = time.monotonic()
    passed = sandbox.run_sandboxed(program, **limits)
    return passed, time.monotonic() - start


@needs_sandbox
def test_writes_deletes_and_renames_outside_leave_no_trace(tmp_path, monkeypatch):
    hidden = tmp_path / "hidden.txt"  # not in the sandbox
    shown = tmp_path / "shown" / "shown.txt"  # in it, read-only, as the system's files are
    hidden.write_text("original")
    shown.parent.mkdir()
    shown.write_text("original")
    modes = {path: path.stat().st_mode for path in (hidden, shown)}
    monkeypatch.setattr(sandbox, "SANDBOX_READ_ONLY", (*sandbox.SANDBOX_READ_ONLY, str(shown.parent)))
    probe = f"nanochat-sandbox-probe-{os.getpid()}"
    new_files = [Path("/tmp") / probe, Path.home() / probe, Path(sys.base_prefix) / probe, Path("/") / probe,
                 tmp_path / probe, shown.parent / probe]
    program = f"""import os, shutil
done = []
for path in {[str(p) for p in new_files]!r}:
    try:
        open(path, "w").write("x"); done.append(path)
    except OSError:
        pass
for path in {[str(hidden), str(shown)]!r}:
    for attempt in (lambda: open(path, "w").write("changed"), lambda: os.remove(path),
                    lambda: os.rename(path, path + ".moved"), lambda: os.chmod(path, 0o777)):
        try:
            attempt(); done.append(path)
        except OSError:
            pass
try:
    shutil.rmtree({str(shown.parent)!r}); done.append("rmtree")
except OSError:
    pass
raise SystemExit(len(done))
"""
    try:
        passed, seconds = run_timed(program)
        assert passed and seconds < 5
        assert not any(path.exists() for path in new_files)
        for path in (hidden, shown):
            assert path.read_text() == "original" and path.stat().st_mode == modes[path]
            assert not path.with_name(path.name + ".moved").exists()
    finally:
        for path in new_files:
            path.unlink(missing_ok=True)


@needs_sandbox
def test_reads_find_nothing_outside_the_system_and_python(tmp_path):
    """The guarantee: only SANDBOX_READ_ONLY and the Python installation exist in the sandbox, so a
    file anywhere else cannot be read, private or world-readable alike. The home folder exists only
    when Python is installed under it, and then holds nothing but the way to Python."""
    secret, public = tmp_path / "secret.txt", tmp_path / "public.txt"
    secret.write_text("private")
    secret.chmod(0o600)
    public.write_text("public")
    public.chmod(0o644)
    home, prefix = Path.home(), Path(sys.base_prefix)
    home_in_sandbox = [prefix.relative_to(home).parts[0]] if prefix.is_relative_to(home) else None
    paths = [str(secret), str(public), "/etc/passwd", "/etc/hostname", str(Path(nc.__file__).resolve())]
    program = f"""import os
seen = []
for path in {paths!r}:
    try:
        open(path).read(); seen.append(path)
    except OSError:
        pass
try:
    home = os.listdir({str(home)!r})
except OSError:
    home = None
assert home == {home_in_sandbox!r}
assert not {{"etc", "tmp", "var"}} & set(os.listdir("/")) and not os.path.exists({os.getcwd()!r})
raise SystemExit(len(seen))
"""
    passed, seconds = run_timed(program)
    assert passed and seconds < 5


@needs_sandbox
def test_signals_reach_no_process_outside():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    other = subprocess.Popen(["sleep", "30"])  # another process of the same user
    program = f"""import os, signal
reached = []
for pid, sig in (({os.getpid()}, signal.SIGUSR1), ({other.pid}, signal.SIGKILL)):
    try:
        os.kill(pid, sig); reached.append(pid)
    except ProcessLookupError:
        pass
visible = [name for name in os.listdir("/proc") if name.isdigit()]
raise SystemExit(len(reached) + 10 * (visible != ["1"]))
"""
    try:
        passed, seconds = run_timed(program)
        time.sleep(0.2)
        assert passed and seconds < 5
        assert not received and other.poll() is None
    finally:
        other.kill()
        other.wait()
        signal.signal(signal.SIGUSR1, previous)


@needs_sandbox
def test_the_python_installation_shows_only_the_interpreter_and_its_lib_folder():
    """A conda environment keeps activation scripts and environment variables (sometimes secrets)
    under its prefix: the sandbox shows the interpreter and the folder of its standard library
    and shared libraries, not the rest of the prefix."""
    prefix, interpreter = Path(sys.base_prefix), Path(sys.executable).resolve()
    if any(prefix.is_relative_to(path) for path in sandbox.SANDBOX_READ_ONLY):
        pytest.skip(f"Python is part of the system here ({prefix})")
    library = Path(os.__file__).resolve().parent.parent  # e.g. <prefix>/lib, above lib/python3.X
    program = f"""import os
assert sorted(os.listdir({str(prefix)!r})) == {sorted({interpreter.relative_to(prefix).parts[0],
                                                         library.relative_to(prefix).parts[0]})!r}
assert os.listdir({str(interpreter.parent)!r}) == [{interpreter.name!r}]
"""
    passed, seconds = run_timed(program)
    assert passed and seconds < 5


KEYRING_CALLS = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}  # add_key, request_key, keyctl


@needs_sandbox
def test_the_callers_keyrings_are_out_of_reach():
    """A key the evaluating process put in its session keyring can be neither found nor read."""
    if platform.machine() not in KEYRING_CALLS:
        pytest.skip(f"no keyring call numbers for {platform.machine()}")
    add_key, request_key, keyctl = KEYRING_CALLS[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    description, secret = f"nanochat-sandbox-probe-{os.getpid()}".encode(), b"the caller's secret"
    serial = libc.syscall(add_key, b"user", description, secret, len(secret), ctypes.c_int(-3))  # session keyring
    if serial < 0:
        pytest.skip(f"this process cannot use keyrings ({os.strerror(ctypes.get_errno())}): nothing to probe")
    program = f"""import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
found = []
serial = libc.syscall({request_key}, b"user", {description!r}, None, ctypes.c_int(0))
found += [serial] if serial >= 0 else []
for key in (serial, {serial}):
    buffer = ctypes.create_string_buffer(64)
    if libc.syscall({keyctl}, 11, ctypes.c_long(key), buffer, 64) >= 0:  # KEYCTL_READ
        found.append(buffer.value)
for keyring in (-3, -4, -5):  # the session, user and user-session keyrings: KEYCTL_GET_KEYRING_ID
    if libc.syscall({keyctl}, 0, ctypes.c_int(keyring), 0) >= 0:
        found.append(keyring)
raise SystemExit(len(found))
"""
    try:
        passed, seconds = run_timed(program)
        assert passed and seconds < 5
    finally:
        libc.syscall(keyctl, 21, ctypes.c_long(serial))  # KEYCTL_INVALIDATE


@needs_sandbox
def test_calls_a_program_has_no_use_for_are_refused():
    """Every call in SANDBOX_DENIED_CALLS, made with zero arguments, fails with EPERM before the
    kernel looks at it (the calls that make processes are left to the bomb tests below)."""
    expected = {"keyctl", "add_key", "request_key", "ptrace", "perf_event_open", "userfaultfd", "process_vm_readv",
                "process_vm_writev", "personality", "mount", "setns", "pivot_root", "chroot", "open_tree",
                "move_mount", "fsopen", "kexec_load", "init_module", "finit_module", "bpf", "io_uring_setup"}
    assert expected <= set(sandbox.SANDBOX_DENIED_CALLS)
    column = 1 if platform.machine() == "aarch64" else 0
    numbers = {name: pair[column] for name, pair in sandbox.SANDBOX_DENIED_CALLS.items()
               if pair[column] is not None and name not in ("clone", "clone3", "fork", "vfork")}
    program = f"""import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
allowed = []
for name, number in {numbers!r}.items():
    if libc.syscall(number, 0, 0, 0, 0, 0, 0) != -1 or ctypes.get_errno() != {errno.EPERM}:
        allowed.append(name)
print(*allowed, file=__import__("sys").stderr)
raise SystemExit(len(allowed))
"""
    passed, seconds = run_timed(program)
    assert passed and seconds < 5


FORK_BOMB = """import os
try:
    if os.fork() == 0:
        os._exit(0)
    raise SystemExit(3)  # a fork got through: stop here rather than bomb the machine
except OSError:
    pass
while True:
    try:
        os.fork()
    except OSError:
        pass
"""

THREAD_BOMB = """import threading, time
threading.stack_size(32768)
try:
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    raise SystemExit(3)  # a thread got through: stop here
except RuntimeError:
    pass
while True:
    try:
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    except RuntimeError:
        pass
"""


@needs_sandbox
@pytest.mark.parametrize("program", [FORK_BOMB, THREAD_BOMB, "while True:\n    pass\n",
                                     "import time\ntime.sleep(60)\n"], ids=["fork bomb", "thread bomb",
                                                                            "busy loop", "sleep"])
def test_runaway_programs_end_at_the_timeout(program):
    before = sandboxed_pythons()
    passed, seconds = run_timed(program, timeout_s=2)
    assert not passed and 2 <= seconds < 5  # it ran until the timeout: the first fork or thread failed
    deadline = time.monotonic() + 2  # killed when bwrap died; give the kernel a moment to tear it down
    while not sandboxed_pythons() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandboxed_pythons() <= before  # nothing of it is left


@needs_sandbox
def test_memory_hogs_get_memory_errors():
    program = """chunks = []
try:
    chunks.append(bytearray(4 << 30))
    raise SystemExit(1)
except MemoryError:
    pass
try:
    for _ in range(32):  # at most 2 GiB, should the limit fail
        chunks.append(bytearray(64 << 20))
    raise SystemExit(2)
except MemoryError:
    pass
"""
    passed, seconds = run_timed(program, memory_bytes=256 << 20)
    assert passed and seconds < 5


@needs_sandbox
def test_no_network_not_even_localhost():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        program = f"""import socket
try:
    socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), 2)
    raise SystemExit(1)
except OSError:
    pass
assert [name for _, name in socket.if_nameindex()] == ["lo"]
"""
        passed, seconds = run_timed(program)
        assert passed and seconds < 5
        with pytest.raises(socket.timeout):
            server.accept()  # no connection arrived


@needs_sandbox
def test_open_files_namespaces_and_shared_memory_are_limited():
    program = """import ctypes
try:
    files = [open("/dev/null") for _ in range(100)]
    raise SystemExit(1)
except OSError:
    pass
libc = ctypes.CDLL(None, use_errno=True)
assert libc.unshare(0x10000000) == -1 and ctypes.get_errno() == 1  # a nested user namespace: EPERM
assert libc.shmget(0, 1 << 20, 0o1600) == -1  # System V shared memory
status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0  # no capabilities, even as root
"""
    passed, seconds = run_timed(program)
    assert passed and seconds < 5


@needs_sandbox
def test_output_to_a_given_file_is_limited_in_size(tmp_path):
    with open(tmp_path / "errors.txt", "w+b") as errors:
        assert not sandbox.run_sandboxed("import sys\nsys.stderr.write('x' * (4 << 20))\n", error_file=errors)
    assert (tmp_path / "errors.txt").stat().st_size <= 1 << 20


@needs_sandbox
def test_only_a_program_that_runs_to_its_end_passes_when_that_is_required():
    """With require_end, exit status 0 is not enough: the program's last line must have run."""
    assert sandbox.run_sandboxed("x = 1\n", require_end=True)
    assert sandbox.run_sandboxed("def f():\n    return 1", require_end=True)  # no newline, an indented end
    for early_exit in ("import os\nos._exit(0)\n", "raise SystemExit(0)\n", "import sys\nsys.exit()\n"):
        assert sandbox.run_sandboxed(early_exit, require_end=False)
        assert not sandbox.run_sandboxed(early_exit + "x = 1\n", require_end=True)


@needs_sandbox
def test_the_end_token_is_nowhere_the_program_can_read_before_its_end():
    """The token is not in the program's text (which it can read back through standard input or its
    code object), its arguments or environment: writing all of these to every file it holds open
    and stopping early does not pass."""
    program = """import gc, os, sys
found = [os.lseek(0, 0, 0) == 0 and os.read(0, 1 << 20), open("/proc/self/cmdline", "rb").read(),
         repr(dict(os.environ)).encode(), repr(sys.argv).encode(), repr(sys._getframe().f_code.co_consts).encode()]
for fd in map(int, os.listdir("/proc/self/fd")):
    for text in found:
        try:
            os.write(fd, text)
        except OSError:
            pass
os._exit(0)
"""
    assert not sandbox.run_sandboxed(program, require_end=True)


def test_without_bubblewrap_humaneval_refuses_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    assert sandbox.sandbox_problem().startswith("bubblewrap is not installed (Debian/Ubuntu: sudo apt-get install bubblewrap")
    with pytest.raises(OSError):
        sandbox.run_sandboxed("print('never')")


def test_a_bwrap_that_cannot_build_the_sandbox_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "bwrap"  # as bwrap answers where user namespaces are forbidden
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = sandbox.sandbox_problem()
    assert problem == ("bwrap could not build the sandbox (bwrap: No permissions to create a new namespace); "
                       "see the README's note on HumanEval")


HUMANEVAL = [dict(task_id="HumanEval/0", prompt='def add(a, b):\n    """Sum of a and b."""\n',
                  test="def check(f):\n    assert f(2, 3) == 5\n", entry_point="add"),
             dict(task_id="HumanEval/1", prompt='def double(x):\n    """Twice x."""\n',
                  test="def check(f):\n    assert f(4) == 8\n", entry_point="double")]
def scripted_engine(tokenizer, replies):
    """An Engine class that answers each HumanEval problem with replies[its function's name]."""
    class ScriptedEngine:
        def __init__(self, model, tokenizer):
            pass

        def generate_batch(self, prompt, num_samples, max_tokens, temperature):
            name = next(name for name in replies if f"def {name}(" in tokenizer.decode(prompt))
            return [tokenizer.encode(replies[name])], None

    return ScriptedEngine


REPLIES = {"add": "    return a + b\n", "double": "```python\ndef double(x):\n    return x + 1\n```"}  # right, wrong


@needs_sandbox
def test_eval_humaneval_scores_a_right_and_a_wrong_answer(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in HUMANEVAL))
    tokenizer = byte_tokenizer()
    local = datasets.load_dataset

    def no_hub(path, *a, **k):  # the other tasks have no local files and the hub is unreachable
        if path in ("json", "parquet"):
            return local(path, *a, **k)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setattr(nc, "Engine", scripted_engine(tokenizer, REPLIES))
    args = nc.build_parser().parse_args(["--stage", "eval", "--data", "hf", "--data-dir", str(tmp_path), "--humaneval"])
    nc.finalize_args(args)
    result = nc.evaluate_real_chat(args, None, tokenizer, nc.Dist())
    assert result["chat_tasks"]["HumanEval"] == dict(nc.accuracy_stats(1, 2), centered=0.5)
    assert "HumanEval      50.0% +- 35.4 [9.5, 90.5] (N=2)" in capsys.readouterr().out



@needs_sandbox
@pytest.mark.parametrize("early_exit", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "exit()\n",
                                        "raise SystemExit\n"])
def test_humaneval_answers_that_exit_before_the_tests_fail(monkeypatch, early_exit):
    tokenizer = byte_tokenizer()
    replies = {"add": "def add(a, b):\n    return a + b\n" + early_exit, "double": "    return 2 * x\n"}

    # a right answer that ends the program before check() runs, and a right one
    monkeypatch.setattr(nc, "Engine", scripted_engine(tokenizer, replies))
    assert nc.evaluate_humaneval(None, tokenizer, [nc.chat_eval_item("HumanEval", row) for row in HUMANEVAL],
                                 nc.Dist()) == nc.accuracy_stats(1, 2)
