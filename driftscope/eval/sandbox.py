"""Run untrusted Python code in a child process that cannot harm the caller, with bounded time, memory and output.

`run_python(code, stdin) -> SandboxResult` (status: one of STATUSES). Isolation is layered: `LEVELS`, best first,
says what each level guarantees; the best this machine allows is found once, by running a probe through each
(`isolation()`, `available()`, `unavailable_reason()`), and every result names the level it ran under. The part that
runs inside the sandbox, around the code, is sandbox_supervisor.py. Memory is bounded per process (RLIMIT_AS: at
most nproc * memory_bytes in all; no cgroup). Nothing is ever unpickled here.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

_SUPERVISOR = "sandbox_supervisor.py"  # run by path, beside this file: under -I it could not be imported
_UNSHARE_DIRS = "/usr/bin:/bin:/usr/sbin:/sbin"
_UID_BASE = 1_000_000  # private uids are drawn from [_UID_BASE, _UID_BASE + 2**24): no /etc/passwd entry uses them
_BACKSTOP_S = 5.0  # the caller's own kill, this long after the supervisor's timeout should have fired
_TAIL_GRACE_S = 0.2  # how long to keep reading pipes that leftover processes hold open after the supervisor exits

STATUSES = ("ok", "error", "timeout", "memory", "killed")


@dataclass(frozen=True)
class Isolation:
    """What one isolation level guarantees beyond rlimits, timeouts, a fresh cwd and an empty environment."""

    name: str
    namespaces: bool  # read-only file system outside the cwd, no network, own pid/ipc/uts namespaces
    private_uid: bool  # a uid of its own: RLIMIT_NPROC is enforced, other users' files and processes are off-limits
    needs_root: bool | None  # True: root only; False: non-root only; None: anyone
    summary: str


LEVELS: dict[str, Isolation] = {i.name: i for i in (
    Isolation("namespaces+uid", True, True, True,
              "mount (read-only), net, pid, ipc, uts namespaces and a private uid"),
    Isolation("userns", True, False, False,
              "user, mount (read-only), net, pid, ipc, uts namespaces; capabilities dropped"),
    Isolation("rlimits+uid", False, True, True,
              "rlimits and a private uid; no file-system or network isolation"),
    Isolation("rlimits", False, False, None,
              "rlimits only; no file-system, network or process isolation"),
)}


@dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int  # exit code, or -signal as in subprocess (a timeout kill is -9)
    stdout: str
    stderr: str
    wall_s: float
    isolation: str  # the level it ran under (a key of LEVELS)
    stdout_truncated: bool = False
    cpu_s: float = 0.0
    max_rss_bytes: int = 0


def _unshare_argv(level: Isolation) -> list[str]:
    exe = shutil.which("unshare", path=_UNSHARE_DIRS)
    if exe is None:
        raise FileNotFoundError(f"no unshare(1) in {_UNSHARE_DIRS}")
    user = ["--user", "--map-root-user"] if level.name == "userns" else []
    return [exe, *user, "--mount", "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private"]


def _interpreter() -> tuple[str, str, str | None]:
    """(real install prefix, interpreter path relative to it, libpython dir relative to it or None)."""
    prefix = os.path.realpath(sys.base_prefix)
    exe = os.path.relpath(os.path.realpath(sys.executable), prefix)
    libdir = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    lib = os.path.relpath(os.path.realpath(libdir), prefix) if libdir else None
    if exe.startswith(".."):
        raise FileNotFoundError(f"interpreter {sys.executable} is not under its prefix {prefix}")
    return prefix, exe, None if lib is None or lib.startswith("..") else lib


def _rmtree(path: str) -> None:
    def fix(func, p, exc):  # a directory the code made unreadable (matters when it ran as our own uid)
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    for dirpath, dirnames, _ in os.walk(path):  # top-down: each directory is opened up before it is entered
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, **({"onexc": fix} if sys.version_info >= (3, 12) else {"onerror": fix}))


def _level(name: str | None) -> Isolation:
    if name is None:
        return LEVELS[isolation()]
    if name not in LEVELS:
        raise ValueError(f"isolation={name!r}: expected one of {sorted(LEVELS)}")
    if (why := unavailable_reason(name)) is not None:
        raise ValueError(f"isolation={name!r} is not available on this machine: {why}")
    return LEVELS[name]


def run_python(
    code: str,
    stdin: str | bytes = "",
    *,
    timeout_s: float = 6.0,
    memory_bytes: int = 1 << 30,
    nproc: int = 8,
    nofile: int = 64,
    file_bytes: int = 64 << 20,
    stdout_bytes: int = 8 << 20,
    stderr_bytes: int = 64 << 10,
    isolation: str | None = None,
) -> SandboxResult:
    """Run `code` as a script with `stdin`: wall-clock `timeout_s`, `memory_bytes` of address space per process,
    at most `nproc` processes and threads (enforced with a private uid or a user namespace; root without either is
    exempt), `nofile` open files, `file_bytes` per written file (under namespaces also the cwd's tmpfs size).
    stdout/stderr beyond their caps are read and dropped (`stdout_truncated`). `isolation` forces a level
    (ValueError if this machine lacks it); default: the best available, `isolation()`."""
    level = _level(isolation)
    return _run(code, stdin, level, timeout_s=timeout_s, memory_bytes=memory_bytes, nproc=nproc, nofile=nofile,
                file_bytes=file_bytes, stdout_bytes=stdout_bytes, stderr_bytes=stderr_bytes)


def _check_args(timeout_s: float, memory_bytes: int, nproc: int, nofile: int, file_bytes: int,
                stdout_bytes: int, stderr_bytes: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s}: expected > 0 seconds")
    for name, value, least in (("memory_bytes", memory_bytes, 64 << 20), ("nproc", nproc, 1),
                               ("nofile", nofile, 16), ("file_bytes", file_bytes, 1),
                               ("stdout_bytes", stdout_bytes, 1), ("stderr_bytes", stderr_bytes, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name}={value!r}: expected an int >= {least}")


def _run(code: str, stdin: str | bytes, level: Isolation, *, timeout_s: float, memory_bytes: int, nproc: int,
         nofile: int, file_bytes: int, stdout_bytes: int, stderr_bytes: int) -> SandboxResult:
    _check_args(timeout_s, memory_bytes, nproc, nofile, file_bytes, stdout_bytes, stderr_bytes)
    root = tempfile.mkdtemp(prefix="driftscope-sandbox-")
    try:
        os.chmod(root, 0o711)  # a private uid may pass through to work/ and python/, not list root
        work, py_mount = os.path.join(root, "work"), os.path.join(root, "python")
        os.mkdir(work, 0o700)
        os.mkdir(py_mount, 0o755)
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(root, "stdin"), "wb") as f:
            f.write(stdin.encode() if isinstance(stdin, str) else stdin)
        uid = _UID_BASE + secrets.randbelow(1 << 24) if level.private_uid else None
        if uid is not None:
            os.chown(work, uid, uid)
        prefix, exe_rel, lib_rel = _interpreter()
        base = py_mount if level.namespaces else prefix
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        if lib_rel is not None and level.namespaces:
            env["LD_LIBRARY_PATH"] = os.path.join(py_mount, lib_rel)  # its RUNPATH may be unreadable to the uid
        status_r, status_w = os.pipe()
        cfg = {"work": work, "py_prefix": prefix, "py_mount": py_mount, "exe": os.path.join(base, exe_rel),
               "env": env, "uid": uid, "namespaces": level.namespaces, "nested_userns": level.name == "userns",
               "limits": {"RLIMIT_CPU": math.ceil(timeout_s) + 1, "RLIMIT_AS": memory_bytes, "RLIMIT_NPROC": nproc,
                          "RLIMIT_NOFILE": nofile, "RLIMIT_FSIZE": file_bytes, "RLIMIT_CORE": 0},
               "timeout_s": timeout_s, "status_fd": status_w}
        argv = (_unshare_argv(level) if level.namespaces else []) + [
            sys.executable, "-I", "-S", os.path.join(os.path.dirname(os.path.abspath(__file__)), _SUPERVISOR),
            json.dumps(cfg)]
        return _spawn(argv, root, env, status_r, status_w, level, timeout_s, stdout_bytes, stderr_bytes)
    finally:
        _rmtree(root)


def _spawn(argv: list[str], root: str, env: dict[str, str], status_r: int, status_w: int, level: Isolation,
           timeout_s: float, stdout_bytes: int, stderr_bytes: int) -> SandboxResult:
    start = time.monotonic()
    try:
        with open(os.path.join(root, "stdin"), "rb") as stdin_f:
            proc = subprocess.Popen(argv, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(status_w,), env=env, cwd=root, start_new_session=True)
    finally:
        os.close(status_w)
    caps = {proc.stdout.fileno(): stdout_bytes, proc.stderr.fileno(): stderr_bytes, status_r: 1 << 16}
    bufs: dict[int, bytearray] = {fd: bytearray() for fd in caps}
    dropped: dict[int, int] = {fd: 0 for fd in caps}
    backstop = start + timeout_s + _BACKSTOP_S
    exited_at = None
    backstopped = False
    with selectors.DefaultSelector() as sel:
        for fd in caps:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if now >= backstop:
                backstopped = True
                break
            if exited_at is not None and now - exited_at > _TAIL_GRACE_S:
                break
            wait = backstop - now if exited_at is None else _TAIL_GRACE_S
            for key, _ in sel.select(min(wait, 0.05)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                room = caps[key.fd] - len(bufs[key.fd])
                bufs[key.fd] += data[:max(room, 0)]
                dropped[key.fd] += max(len(data) - max(room, 0), 0)
    groups = [proc.pid] + _orphaned_group(bytes(bufs[status_r]))
    for group in groups:  # the supervisor's (in a pid namespace all die with it, their init), and the code's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    proc.wait()
    wall = time.monotonic() - start
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    out, err, status, truncated = bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_r]), dropped[out_fd] > 0
    proc.stdout.close()
    proc.stderr.close()
    os.close(status_r)
    return _result(out, err, status, truncated, level, wall, proc.returncode, backstopped)


def _orphaned_group(status: bytes) -> list[int]:
    """The code's process group when its supervisor died before reporting (the code may kill it at "rlimits")."""
    records = [json.loads(line) for line in status.decode().splitlines() if line.strip()]
    if any("exitcode" in rep for rep in records):
        return []  # the supervisor cleaned up; that group id may since have been reused
    return [rep["group"] for rep in records if "group" in rep]


def _result(out: bytes, err: bytes, status: bytes, truncated: bool, level: Isolation, wall: float, rc: int,
            backstopped: bool) -> SandboxResult:
    records = [json.loads(line) for line in status.decode().splitlines() if line.strip()]
    for rep in records:
        if "setup_error" in rep:
            raise RuntimeError(f"sandbox setup failed under isolation {level.name!r}: {rep['setup_error']}")
    reports = [rep for rep in records if "exitcode" in rep]
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if not reports:  # killed by the backstop, by the code (level "rlimits"), or unshare failed before starting it
        note = f"\n[sandbox] the supervisor ended (rc {rc}) without reporting the code's exit status\n"
        return SandboxResult("timeout" if backstopped else "killed", rc, stdout, stderr + note, wall, level.name,
                             truncated)
    rep = reports[-1]
    code = rep["exitcode"]
    tail = stderr[-2000:]
    if rep["timed_out"] or code == -signal.SIGXCPU:
        status_name = "timeout"
    elif code != 0 and ("MemoryError" in tail or "Cannot allocate memory" in tail):
        status_name = "memory"
    elif code < 0:
        status_name = "killed"
    else:
        status_name = "ok" if code == 0 else "error"
    return SandboxResult(status_name, code, stdout, stderr, wall, level.name,
                         truncated, rep["cpu_s"], rep["max_rss_kb"] * 1024)


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str) -> str | None:
    """None when level `name` works here (a probe ran through it), else one line saying why not."""
    level = LEVELS[name]
    root = os.geteuid() == 0
    if level.needs_root is True and not root:
        return "needs root (to switch to a private uid)"
    if level.needs_root is False and root:
        return "not offered to root: a user namespace mapped to root is exempt from RLIMIT_NPROC"
    try:
        res = _run("print('ok')", "", level, timeout_s=10.0, memory_bytes=1 << 30, nproc=8, nofile=64,
                   file_bytes=1 << 20, stdout_bytes=1 << 10, stderr_bytes=4 << 10)
    except (RuntimeError, OSError) as e:
        return str(e)
    if res.status != "ok" or res.stdout != "ok\n":
        return f"probe ended {res.status} (rc {res.returncode}): {res.stderr.strip()[-300:]}"
    return None


@functools.lru_cache(maxsize=None)
def isolation() -> str:
    """The best isolation level this machine allows (a key of LEVELS), detected once per process."""
    for name in LEVELS:
        if unavailable_reason(name) is None:
            return name
    raise RuntimeError(f"no sandbox level works here: { {n: unavailable_reason(n) for n in LEVELS} }")


def available() -> list[str]:
    """Every level that works here, best first."""
    return [name for name in LEVELS if unavailable_reason(name) is None]
