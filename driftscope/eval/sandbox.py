"""Run untrusted Python code in a child process that cannot harm the caller, with bounded time, memory and output.

`run_python(code, stdin) -> SandboxResult` (status ok | error | timeout | memory | killed). Isolation is layered; the
best level this machine allows is found once, by running a probe through each, and `isolation()` names it; every
result carries the level it ran under. Levels, best first (`LEVELS` says what each guarantees):

- "namespaces+uid" (root): new mount, network, pid, ipc and uts namespaces (util-linux `unshare`); every mount is
  remounted read-only and nosuid, the working directory is a fresh tmpfs of `file_bytes`; the only network device is
  a downed loopback; the code sees only its own processes; and it runs as a fresh unprivileged uid, so RLIMIT_NPROC
  bounds it alone and it can signal nothing outside. The interpreter's install is bind-mounted in read-only (it may
  live under a 0700 home), with LD_LIBRARY_PATH pointing at its libpython.
- "userns" (non-root): the same inside a user namespace; the code loses every capability by being exec'd as a
  non-root uid of a nested user namespace. Not offered to root: a user namespace of root is exempt from RLIMIT_NPROC.
- "rlimits+uid" (root, no namespaces): resource limits and a fresh uid; no file-system or network isolation.
- "rlimits": resource limits only; the code can read and write what the caller can and use the network.

Always: a trusted supervisor (this file run as a script, stdlib only; pid 1 of the namespace) forks the code as
`python -I -S main.py` in an empty temporary directory (deleted afterwards) with RLIMIT_CPU/AS/NOFILE/NPROC/FSIZE/CORE,
the environment {PATH, LANG, HOME, TMPDIR} only, and a wall-clock timer; it reports the exit status on a pipe the
code never holds, and kills what the code leaves behind (with the pid namespace, the private uid, or the code's
process group plus a subreaper). The caller reads stdout/stderr with byte caps and kills the process groups on a
backstop timeout. Memory is bounded per process (RLIMIT_AS), so at most nproc * memory_bytes in all; no cgroup.
Nothing is ever unpickled here.
"""
from __future__ import annotations

import json
import os
import signal
import sys

_UNSHARE_DIRS = "/usr/bin:/bin:/usr/sbin:/sbin"
_UID_BASE = 1_000_000  # private uids are drawn from [_UID_BASE, _UID_BASE + 2**24): no /etc/passwd entry uses them
_SETUP_FAILED = 125
_BACKSTOP_S = 5.0  # the caller's own kill, this long after the supervisor's timeout should have fired
_TAIL_GRACE_S = 0.2  # how long to keep reading pipes that leftover processes hold open after the supervisor exits

# mount(2) flags, <sys/mount.h>
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 1024, 2048, 4096, 16384
_MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
_KEPT_MOUNT_FLAGS = {  # per-mount flags a remount must repeat (a user namespace may not clear them)
    "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "nosuid": _MS_NOSUID, "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME,
}
_CLONE_NEWUSER = 0x10000000
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 4, 38, 36
_NESTED_UID = 1000  # the code's uid inside the nested user namespace of the "userns" level


# ----------------------------------------------------------------------------------------------------------------
# Supervisor: runs as `python -I -S sandbox.py '<json config>'` inside the namespaces, before and around the code.
# ----------------------------------------------------------------------------------------------------------------


def _libc():  # ctypes is imported only by the supervisor, and only where it mounts or unshares
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc, ctypes


def _mount(libc, ctypes, source: str | None, target: str, flags: int, fstype: str | None = None,
           data: str | None = None) -> None:
    if libc.mount(source.encode() if source else None, target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} on {target} (flags {flags:#x}): {os.strerror(err)}")


def _mountinfo() -> list[tuple[str, list[str], str]]:
    """(mount point, per-mount options, file-system type) for every mount of this namespace."""
    import re

    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, fields[5].split(","), fields[fields.index("-") + 1]))
    return out


def _read_only_world(work: str, owner: int, disk_bytes: int, py_prefix: str, py_mount: str, keep_proc: bool) -> None:
    """Every mount read-only and nosuid (proc kept writable if `keep_proc`: a nested user namespace writes its maps
    there); `work` a fresh tmpfs of `disk_bytes` owned by `owner` holding main.py; the interpreter bound at py_mount."""
    libc, ctypes = _libc()
    main = os.path.join(work, "main.py")
    with open(main, "rb") as f:
        code = f.read()
    _mount(libc, ctypes, None, "/", _MS_REC | _MS_PRIVATE)  # nothing done here propagates back to the host
    _mount(libc, ctypes, py_prefix, py_mount, _MS_BIND | _MS_REC)
    for point, opts, fstype in _mountinfo():
        if keep_proc and fstype == "proc":
            continue
        kept = sum(flag for name, flag in _KEPT_MOUNT_FLAGS.items() if name in opts)
        _mount(libc, ctypes, None, point, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | kept)
    _mount(libc, ctypes, "sandbox", work, _MS_NOSUID | _MS_NODEV, "tmpfs",
           f"size={disk_bytes},nr_inodes=4096,mode=0700,uid={owner},gid={owner}")
    with open(main, "wb") as f:
        f.write(code)
    os.chown(main, owner, owner)
    if not os.statvfs("/").f_flag & os.ST_RDONLY or os.statvfs(work).f_flag & os.ST_RDONLY:
        raise OSError("after remounting, / is not read-only or the working directory is not writable")


def _nested_user_namespace() -> None:
    """Enter a user namespace as uid/gid _NESTED_UID: the exec that follows then drops every capability."""
    libc, ctypes = _libc()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{_NESTED_UID} {uid} 1"),
                       ("gid_map", f"{_NESTED_UID} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _set_limits(limits: dict[str, int]) -> None:
    import resource

    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value) if name != "RLIMIT_CPU" else (value, value + 1))


def _prctl(option: int, value: int = 1) -> None:
    libc, ctypes = _libc()
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {value}): {os.strerror(err)}")


def _kill_descendants() -> None:
    """SIGKILL and reap what the code left behind; as a subreaper its orphans (setsid ones too) are our children."""
    children = f"/proc/self/task/{os.getpid()}/children"
    for _ in range(100):
        try:
            with open(children) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return  # a kernel without CONFIG_PROC_CHILDREN: leftovers outlive the run (level "rlimits" only)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (all of them belong to this sandbox: the uid is private to it)."""
    for _ in range(100):
        pid = os.fork()
        if pid == 0:
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # all processes this uid may signal, never the caller itself
                os._exit(0)
            except ProcessLookupError:
                os._exit(1)  # nothing left
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return


def _exec_code(cfg: dict, status_fd: int) -> None:
    """Child of the supervisor: limits, identity, then exec the interpreter on main.py. Never returns."""
    try:
        _prctl(_PR_SET_DUMPABLE, 1)  # its own /proc files stay its own (exec would reset this anyway)
        _set_limits(cfg["limits"])
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        elif cfg["nested_userns"]:
            _nested_user_namespace()
        if cfg["namespaces"]:
            _prctl(_PR_SET_NO_NEW_PRIVS)
        else:
            os.setpgid(0, 0)  # a group of its own: one killpg stops it and its forks, atomically
        os.chdir(cfg["work"])
        os.execve(cfg["exe"], [cfg["exe"], "-I", "-S", "main.py"], cfg["env"])
    except BaseException as e:  # report, never fall through into the supervisor's code
        os.write(status_fd, (json.dumps({"setup_error": f"{type(e).__name__}: {e}"}) + "\n").encode())
    os._exit(_SETUP_FAILED)


def _supervise(cfg: dict) -> None:
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)  # the code never holds the status pipe
    try:
        _prctl(_PR_SET_DUMPABLE, 0)  # nor reaches it through /proc/<supervisor>/fd, nor ptraces this process
        if cfg["namespaces"]:
            owner = cfg["uid"] if cfg["uid"] is not None else 0  # 0: the user namespace's root, i.e. the caller
            _read_only_world(cfg["work"], owner, cfg["limits"]["RLIMIT_FSIZE"], cfg["py_prefix"], cfg["py_mount"],
                             keep_proc=cfg["nested_userns"])
        else:
            _prctl(_PR_SET_CHILD_SUBREAPER)
    except BaseException as e:
        os.write(status_fd, (json.dumps({"setup_error": f"{type(e).__name__}: {e}"}) + "\n").encode())
        os._exit(_SETUP_FAILED)
    pid = os.fork()
    if pid == 0:
        _exec_code(cfg, status_fd)
    grouped = not cfg["namespaces"]  # outside a pid namespace the code leads its own process group
    if grouped:
        try:
            os.setpgid(pid, pid)  # also here, so no kill below can precede the child's own setpgid
        except OSError:
            pass  # it already exec'd (then it did it itself) or died
        os.write(status_fd, (json.dumps({"group": pid}) + "\n").encode())  # the caller's last resort
    timed_out = []

    def kill_code() -> None:
        try:
            os.killpg(pid, signal.SIGKILL) if grouped else os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def on_alarm(signum, frame):  # the child is not reaped yet, so `pid` is still its pid (and group id)
        timed_out.append(True)
        kill_code()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
    _, status, usage = os.wait4(pid, 0)  # retried after the alarm's EINTR (PEP 475)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if cfg["uid"] is not None:
        _kill_uid(cfg["uid"])  # leftovers; in a pid namespace they also die with this process, its init
    elif grouped:
        kill_code()  # its group (a reaped leader's id stays taken while the group has members)
        _kill_descendants()  # what left the group with setsid()
    report = {"exitcode": os.waitstatus_to_exitcode(status), "timed_out": bool(timed_out),
              "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kb": usage.ru_maxrss}
    os.write(status_fd, (json.dumps(report) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    _supervise(json.loads(sys.argv[1]))
    raise SystemExit(0)

# ----------------------------------------------------------------------------------------------------------------
# Caller side.
# ----------------------------------------------------------------------------------------------------------------

import functools  # noqa: E402  (the supervisor above stops before these: it needs none of them)
import math  # noqa: E402
import secrets  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

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


def _limits(timeout_s: float, memory_bytes: int, nproc: int, nofile: int, file_bytes: int) -> dict[str, int]:
    return {"RLIMIT_CPU": math.ceil(timeout_s) + 1, "RLIMIT_AS": memory_bytes, "RLIMIT_NPROC": nproc,
            "RLIMIT_NOFILE": nofile, "RLIMIT_FSIZE": file_bytes, "RLIMIT_CORE": 0}


def _rmtree(path: str) -> None:
    def fix(func, p, exc):  # a directory the code made unreadable (matters when it ran as our own uid)
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    for dirpath, dirnames, _ in os.walk(path):  # top-down: each directory is opened up before it is entered
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            if not os.path.islink(sub):
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)


def _level(name: str | None) -> Isolation:
    if name is None:
        return LEVELS[isolation()]
    if name not in LEVELS:
        raise ValueError(f"isolation={name!r}: expected one of {sorted(LEVELS)}")
    why = unavailable_reason(name)
    if why is not None:
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
               "limits": _limits(timeout_s, memory_bytes, nproc, nofile, file_bytes), "timeout_s": timeout_s,
               "status_fd": status_w}
        argv = (_unshare_argv(level) if level.namespaces else []) + [
            sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)]
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
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
