"""The sandbox's trusted supervisor, run by sandbox.py as `python -I -S sandbox_supervisor.py '<json config>'`.

Stdlib only (under -I nothing of driftscope is importable); inside the namespaces it is their pid 1. It builds the
read-only world (namespace levels) or becomes a subreaper, forks the code as `python -I -S main.py` with the rlimits
and identity of `cfg`, kills it at `cfg["timeout_s"]`, kills what it left behind, and writes one JSON line to
`cfg["status_fd"]` (a pipe the code never holds): {"exitcode", "timed_out", "cpu_s", "max_rss_kb"}, or
{"setup_error"} with exit status 125; at levels without a pid namespace first {"group": pgid} of the code.
`cfg` (built by sandbox._run): work, py_prefix, py_mount, exe, env, uid, namespaces, nested_userns, limits,
timeout_s, status_fd.
"""
from __future__ import annotations

import json
import os
import signal
import sys

_SETUP_FAILED = 125

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
    _mount(libc, ctypes, py_prefix, py_mount, _MS_BIND | _MS_REC)  # its install may be under a 0700 home
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
