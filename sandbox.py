"""Run what a model wrote, safely: its arithmetic with `calculator` (the chat engine's tool, which
reads the expression and never executes it), and untrusted Python code (HumanEval answers) in a
sandbox, on Linux.

    import sandbox
    sandbox.sandbox_problem()                        # None, or one line saying what is missing
    sandbox.run_sandboxed("assert 1 + 1 == 2\n")     # True: it exited with status 0 in time

bubblewrap (bwrap, the sandbox tool under Flatpak, packaged by every major distribution) builds
the sandbox from Linux namespaces, and a seccomp filter closes what the namespaces leave open; see
run_sandboxed for exactly what the code can and cannot reach, and the README for the guarantees.
nanochat_one.py's engine and HumanEval evaluation are the users; this imports nothing from it.
"""
import math
import os
import re
import sys
from pathlib import Path

# What the sandbox shows, read-only, besides the interpreter and its library folder
# (python_installation): the system's programs and libraries. Home folders, /etc, /tmp, /var, the
# data and the checkpoints are absent, whatever their permissions.
SANDBOX_READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")

# The calls the seccomp filter refuses: all that a HumanEval program (arithmetic, strings, lists,
# the standard library) has no use for and that reach past the namespaces, to other processes, the
# user's keys or the machine. A denylist rather than a list of what is allowed: what Python and the
# C library call at start-up changes with their versions, and a refused call there would fail
# every answer on some machine; the namespaces, not this list, are what hides files and processes.
SANDBOX_DENIED_CALLS = {  # system call -> its number on x86_64, on aarch64 (None: no such call there)
    # processes and threads: the program stays one process with one thread
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None),
    # namespaces and mounts: a nested user namespace would let it mount a memory file system of its own
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    # memory outside RLIMIT_AS: System V and POSIX IPC, io_uring's kernel workers, bpf's kernel-memory maps
    "shmget": (29, 194), "msgget": (68, 186), "semget": (64, 190), "mq_open": (240, 180),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "bpf": (321, 280),
    # the kernel's keyrings: the evaluating user's and session's keys (tokens, credentials) are not
    # in any namespace, so only refusing these calls keeps them out of reach
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    # other processes' memory and files, the kernel's insides: tracing, profiling, page-fault handlers,
    # handles that open files by number, address-space randomisation switched off (personality)
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "pidfd_open": (434, 434), "pidfd_getfd": (438, 438), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "personality": (135, 92), "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    "fanotify_init": (300, 262), "lookup_dcookie": (212, 18),
    # the machine: kernel modules, kexec, reboot, swap, clocks, names, accounting, quotas, the kernel
    # log, I/O ports (these need capabilities it does not have; refused before the kernel looks)
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171),
    "sethostname": (170, 161), "setdomainname": (171, 162), "acct": (163, 89), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "syslog": (103, 116), "vhangup": (153, 58),
    "iopl": (172, None), "ioperm": (173, None), "modify_ldt": (154, None), "uselib": (134, None),
}

# The line that run_sandboxed(require_end=True) appends to a program: it hands back the token that
# waits for it on the socket `fd` (see run_sandboxed for why this is evidence).
SANDBOX_END_LINE = "\nimport os as _sandbox_os\n_sandbox_os.write({fd}, _sandbox_os.read({fd}, 64))\n"


def sandbox_seccomp_filter():
    """The seccomp filter of the sandbox, as bwrap --seccomp reads it: a classic BPF program that the
    kernel runs on every system call of the sandboxed process. It makes the calls in
    SANDBOX_DENIED_CALLS, calls of another architecture (x86_64's x32 calls, numbered from
    0x40000000, and 32-bit ones) fail with EPERM, and lets the rest through. So the program stays
    one process with one thread, a limit that RLIMIT_NPROC cannot set: the kernel does not apply it
    to root. Each instruction is (operation, jump if true, jump if false, operand); a jump skips
    that many instructions."""
    import errno
    import platform
    import struct
    audit_arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if audit_arch is None:
        raise OSError(f"the sandbox's seccomp filter knows x86_64 and aarch64, not {platform.machine()}")
    column = 1 if platform.machine() == "aarch64" else 0
    numbers = [pair[column] for pair in SANDBOX_DENIED_CALLS.values() if pair[column] is not None]
    LOAD, JUMP_IF_EQUAL, JUMP_IF_AT_LEAST, RETURN = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ...
    ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
    program = [(LOAD, 0, 0, 4),  # the call's architecture (struct seccomp_data: nr at 0, arch at 4)
               (JUMP_IF_EQUAL, 1, 0, audit_arch),  # ours: skip the DENY below
               (RETURN, 0, 0, DENY),
               (LOAD, 0, 0, 0)]  # the call's number
    checks = [(JUMP_IF_AT_LEAST, 0x40000000)] + [(JUMP_IF_EQUAL, number) for number in numbers]
    program += [(operation, len(checks) - i, 0, value) for i, (operation, value) in enumerate(checks)]  # to DENY
    program += [(RETURN, 0, 0, ALLOW), (RETURN, 0, 0, DENY)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def python_installation():
    """What the sandbox shows of the Python installation: the interpreter, and the folder that holds
    its standard library, e.g. <prefix>/lib above lib/python3.X, with lib-dynload and the shared
    libraries that the interpreter and those modules link to (libpython; libffi, libssl, ... in a
    conda environment). The rest of the prefix stays out: a conda environment keeps activation
    scripts under etc/ and environment variables, sometimes secrets, under conda-meta/. Paths
    already in SANDBOX_READ_ONLY (a system Python) are left out."""
    import sysconfig
    library = os.path.dirname(os.path.realpath(sysconfig.get_path("stdlib")))  # of the base, not of a venv
    paths = [os.path.realpath(sys.executable), library]
    return [path for path in paths if not any(Path(path).is_relative_to(shown) for shown in SANDBOX_READ_ONLY)]


def run_sandboxed(program, timeout_s=10.0, memory_bytes=1 << 30, error_file=None, require_end=False):
    """Run untrusted Python code; True when it exits with status 0 in time (and, with require_end,
    when it also ran to its last line).

    The code runs under bwrap with the interpreter of the Python that runs this file (`python -I`,
    its standard library, an empty environment) and gets
      - files: SANDBOX_READ_ONLY and python_installation(), read-only; nothing else exists, and
        nothing is writable (the code arrives on standard input);
      - processes: only itself, as PID 1 of a new PID namespace, with no capabilities; the seccomp
        filter above refuses it any new process or thread, the kernel's keyrings, tracing and the
        other calls in SANDBOX_DENIED_CALLS;
      - no network (a new network namespace: not even the host's localhost), IPC or host name;
      - limits on address space, CPU seconds, file size (what it may write to a file it was given,
        such as error_file) and open files.
    Without bwrap the code is not run and this raises; when bwrap cannot build the sandbox it runs
    nothing and this returns False (sandbox_problem() says why). At the timeout, or if this process
    dies, bwrap is killed and takes the sandbox with it (--die-with-parent).
    error_file: a file that receives bwrap's and the code's error output (default: discarded).
    require_end: exit status 0 is not evidence that a program finished, since its code may call
    os._exit(0) or sys.exit() before the tests run. With require_end, a fresh random token waits on
    a socket that the program inherits; SANDBOX_END_LINE, appended after its last line, reads it and
    writes it back; the run passes only if the token came back. The token is nowhere else: not in
    the program's text (which its code can read back from standard input or from its code object),
    its arguments, environment or files, so no line before the end can learn it from them. What this
    cannot stop: code that reads that socket on purpose before the end. The program and its last
    line are one process, and one process keeps no secret from itself (nor can it stop an answer
    from returning an object equal to everything): this catches answers that end early, and an
    answer built to cheat the check is beyond what any check run in the same process can catch."""
    import resource
    import secrets
    import shutil
    import signal
    import socket
    import subprocess
    import tempfile
    if sys.platform != "linux":
        raise OSError("the sandbox needs Linux (namespaces and seccomp, through bubblewrap)")
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise OSError("bubblewrap is not installed (Debian/Ubuntu: sudo apt-get install bubblewrap; "
                      "Fedora: sudo dnf install bubblewrap; Arch: sudo pacman -S bubblewrap)")
    installation = python_installation()
    for private in (Path.home(), Path.cwd()):  # should the Python installation's lib folder hold either
        for path in installation:
            if private.is_relative_to(path):
                raise OSError(f"the Python installation's {path} holds {private}, which the sandbox would show")
    seccomp_filter = sandbox_seccomp_filter()

    def limit():  # runs in the child between fork and exec; bwrap and the code inherit the limits
        for which, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, math.ceil(timeout_s)),
                             (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))

    ours, theirs = socket.socketpair()  # the token's way in and back out (require_end)
    token = secrets.token_hex(16).encode()
    with ours, theirs, tempfile.TemporaryFile() as code, tempfile.TemporaryFile() as rules:
        passed_fds = [rules.fileno()]
        if require_end:
            ours.sendall(token)
            program += SANDBOX_END_LINE.format(fd=theirs.fileno())
            passed_fds.append(theirs.fileno())
        code.write(program.encode())
        rules.write(seccomp_filter)
        code.seek(0)
        rules.seek(0)
        command = [bwrap, "--unshare-all", "--unshare-user", "--cap-drop", "ALL",  # as root too: no capabilities
                   "--die-with-parent", "--new-session", "--as-pid-1"]  # setsid: no way to the terminal
        for path in SANDBOX_READ_ONLY:
            command += ["--ro-bind-try", path, path]
        for path in installation:
            command += ["--ro-bind", path, path]
        command += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/",
                    "--seccomp", str(rules.fileno()), os.path.realpath(sys.executable), "-I", "-"]
        with subprocess.Popen(command, env={}, stdin=code, stdout=subprocess.DEVNULL,
                              stderr=error_file or subprocess.DEVNULL, pass_fds=passed_fds,
                              preexec_fn=limit, start_new_session=True) as process:
            try:
                status = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return False
        if status != 0 or not require_end:
            return status == 0
        ours.setblocking(False)
        try:
            return ours.recv(64) == token
        except BlockingIOError:  # nothing came back: the program ended before its last line
            return False


def sandbox_problem():
    """None when run_sandboxed works on this machine, else one line: what is missing and how to get it."""
    import tempfile
    with tempfile.TemporaryFile() as errors:
        try:
            if run_sandboxed("import os\nassert os.getpid() == 1\n", error_file=errors):
                return None
        except (ImportError, OSError) as e:  # ImportError: no `resource` module (Windows)
            return str(e)
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines() or ["no message"]
    return f"bwrap could not build the sandbox ({lines[-1]}); see the README's note on HumanEval"


# -----------------------------------------------------------------------------------------------
# The calculator tool

def calculator(expression, max_length=200, max_exponent=64, max_magnitude=10**60):
    """Evaluate arithmetic safely: returns (True, result text) or (False, reason).

    The text is parsed with `ast` and walked by hand: only numbers, + - * / // % **, unary
    signs and parentheses are allowed, with bounded input length, exponents and intermediate
    sizes. Nothing is ever executed, so names, calls, attributes and strings are refused."""
    import ast
    import operator
    import warnings
    if len(expression) > max_length:
        return False, f"refused: expression longer than {max_length} characters"
    binary = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
    unary = {ast.UAdd: operator.pos, ast.USub: operator.neg}

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value
        elif isinstance(node, ast.UnaryOp) and type(node.op) in unary:
            value = unary[type(node.op)](walk(node.operand))
        elif isinstance(node, ast.BinOp) and type(node.op) in binary:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > max_exponent:
                raise ValueError(f"exponent larger than {max_exponent}")
            value = binary[type(node.op)](left, right)
        else:
            raise ValueError(f"{type(node).__name__} is not allowed (only numbers and + - * / // % **)")
        if isinstance(value, complex) or abs(value) > max_magnitude:
            raise ValueError("result too large")
        return value

    try:
        with warnings.catch_warnings():  # text like "3x" would make the parser warn on stderr
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), mode="eval")
        value = walk(tree)
    except SyntaxError:
        return False, "refused: not an arithmetic expression"
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        return False, f"refused: {e}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return False, "refused: result is not a finite number"
        value = int(value) if value.is_integer() else round(value, 6)
    return True, str(value)


def humaneval_program(item, reply):
    """The program that checks one HumanEval answer: the prompt's imports, the model's code (the
    first ``` block if it wrote one; appended to the prompt if it only wrote the function's
    body), the task's tests, and check(<function>)."""
    block = re.search(r"```(?:python)?\n(.*?)```", reply, re.DOTALL)
    code = block.group(1) if block else reply
    if f"def {item['entry_point']}" not in code:
        code = item["prompt"] + code
    imports = "\n".join(line for line in item["prompt"].splitlines() if line.startswith(("import ", "from ")))
    return f"{imports}\n\n{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"
