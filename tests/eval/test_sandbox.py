"""Sandbox: normal runs, and hostile programs contained at every isolation level this machine offers.

Each hostile test runs once per level of `sandbox.LEVELS`; a level the machine lacks is skipped with its reason,
and a guarantee a level does not make (e.g. a read-only file system under "rlimits") is skipped saying so.
"""
from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from driftscope.eval import sandbox
from driftscope.eval.sandbox import LEVELS, run_python

ENV_KEYS = {"PATH", "LANG", "HOME", "TMPDIR", "LD_LIBRARY_PATH"}


@pytest.fixture(params=list(LEVELS))
def level(request) -> str:
    why = sandbox.unavailable_reason(request.param)
    if why is not None:
        pytest.skip(f"isolation {request.param!r} unavailable here: {why}")
    return request.param


def _needs(level: str, what: str) -> None:
    iso = LEVELS[level]
    ok = {"namespaces": iso.namespaces,
          "processes": iso.namespaces or iso.private_uid,
          "nproc": iso.namespaces or iso.private_uid or os.geteuid() != 0}[what]
    if not ok:
        pytest.skip(f"isolation {level!r} does not promise {what} isolation ({iso.summary})")


def _processes_named(comm: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().strip() == comm:
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def _set_comm(comm: str) -> str:  # code that names the process (and so its forks) for _processes_named
    return f"import ctypes\nctypes.CDLL(None).prctl(15, {comm.encode()!r}, 0, 0, 0)\n"


def test_best_level_is_reported():
    best = sandbox.isolation()
    assert best in LEVELS and best == sandbox.available()[0]
    res = run_python("print('hi')")
    assert (res.status, res.returncode, res.stdout, res.isolation) == ("ok", 0, "hi\n", best)


def test_stdin_stdout_and_exit_codes(level):
    res = run_python("import sys\nprint(sys.stdin.read().upper(), end='')\nprint(open(0).read() == '')", "abc\n",
                     isolation=level)
    assert (res.status, res.stdout) == ("ok", "ABC\nTrue\n"), res
    res = run_python("import sys\nprint('partial')\nsys.exit(3)", isolation=level)
    assert (res.status, res.returncode, res.stdout) == ("error", 3, "partial\n")
    res = run_python("raise KeyError('boom')", isolation=level)
    assert res.status == "error" and "KeyError: 'boom'" in res.stderr
    res = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", isolation=level)
    assert (res.status, res.returncode) == ("killed", -15)


def test_fresh_directory_removed_afterwards(level):
    res = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('f.txt', 'w').write('x')",
                     isolation=level)
    cwd, listing = res.stdout.splitlines()
    assert res.status == "ok" and listing == "['main.py']"
    assert not os.path.exists(cwd), f"sandbox directory {cwd} left behind"


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"], ids=["spin", "sleep"])
def test_infinite_loop_times_out_promptly(level, code):
    t0 = time.monotonic()
    res = run_python(code, timeout_s=0.5, isolation=level)
    took = time.monotonic() - t0
    assert res.status == "timeout" and res.returncode == -9, res
    assert took < 2.5, f"returned after {took:.2f} s for a 0.5 s timeout"


def test_memory_hog_stopped_not_the_parent(level):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", memory_bytes=256 << 20,
                     isolation=level)
    assert res.status == "memory" and "MemoryError" in res.stderr, res
    assert res.max_rss_bytes <= 256 << 20, f"child peaked at {res.max_rss_bytes >> 20} MiB over its 256 MiB cap"
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kib < 64 << 10, f"the parent grew by {grew_kib >> 10} MiB"


def test_output_flood_is_capped(level):
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout_s=0.5,
                     stdout_bytes=1 << 16, isolation=level)
    assert res.status == "timeout" and res.stdout_truncated, res.status
    assert len(res.stdout) == 1 << 16, f"kept {len(res.stdout)} bytes of stdout, cap 65536"


def test_fork_bomb_contained(level):
    _needs(level, "nproc")
    comm = "bomb" + secrets.token_hex(4)
    code = _set_comm(comm) + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    res = run_python(code, timeout_s=1.0, nproc=16, isolation=level)
    took = time.monotonic() - t0
    assert res.status == "timeout", res
    assert took < 5.0, f"fork bomb run returned after {took:.2f} s for a 1 s timeout"
    assert _processes_named(comm) == [], "fork bomb processes outlived the run"
    assert subprocess.run(["true"], timeout=10).returncode == 0  # this machine can still start processes


def test_leftover_processes_killed(level):
    comm = "left" + secrets.token_hex(4)
    code = _set_comm(comm) + ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                              "print('parent done')\n")
    res = run_python(code, timeout_s=5.0, isolation=level)
    assert (res.status, res.stdout) == ("ok", "parent done\n"), res
    time.sleep(0.1)
    assert _processes_named(comm) == [], "a setsid() child outlived the run"


def test_disk_use_bounded(level):
    _needs(level, "namespaces")
    code = ("import os\nfor k in range(8):\n    with open(f'f{k}', 'wb') as f:\n        f.write(b'x' * (256 << 10))\n"
            "    print(k, flush=True)\n")
    res = run_python(code, file_bytes=1 << 20, isolation=level)
    assert res.status == "error" and "No space left on device" in res.stderr, res
    assert len(res.stdout.split()) < 4  # the 1 MiB tmpfs filled before 4 x 256 KiB were written


@pytest.fixture
def outside_dir():
    """A world-writable directory outside the sandbox: only a read-only mount can stop the write."""
    d = tempfile.mkdtemp(prefix="driftscope-outside-", dir="/tmp")
    os.chmod(d, 0o777)
    yield Path(d)
    shutil.rmtree(d)


def test_cannot_write_outside_its_directory(level, outside_dir):
    _needs(level, "namespaces")
    target = outside_dir / "escaped.txt"
    code = (f"open('inside.txt', 'w').write('ok')\nprint('inside ok', flush=True)\n"
            f"open({str(target)!r}, 'w').write('escaped')\n")
    res = run_python(code, isolation=level)
    assert res.stdout == "inside ok\n" and res.status == "error", res
    assert "Read-only file system" in res.stderr, res.stderr
    assert not target.exists(), f"the sandbox wrote {target}"


@pytest.fixture
def secret_process(monkeypatch):
    """A secret in this process's environment and in a sibling process's /proc/<pid>/environ."""
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("DRIFTSCOPE_SANDBOX_SECRET", secret)
    proc = subprocess.Popen(["sleep", "30"], env={"DRIFTSCOPE_SANDBOX_SECRET": secret})
    yield secret
    proc.kill()
    proc.wait()


def test_environment_reveals_nothing(level, secret_process):
    code = ("import json, os\nprint(json.dumps(sorted(os.environ)))\nfound = []\n"
            "for pid in os.listdir('/proc'):\n    try:\n"
            "        if b'DRIFTSCOPE_SANDBOX_SECRET' in open(f'/proc/{pid}/environ', 'rb').read():\n"
            "            found.append(pid)\n    except OSError:\n        pass\nprint(found)\n")
    res = run_python(code, isolation=level)
    keys_line, found_line = res.stdout.splitlines()
    assert set(json.loads(keys_line)) <= ENV_KEYS, keys_line
    assert secret_process not in res.stdout
    iso = LEVELS[level]
    if iso.namespaces or iso.private_uid:
        assert found_line == "[]", f"the sandbox read another process's environment: pids {found_line}"


def test_cannot_connect_to_a_local_socket(level):
    _needs(level, "namespaces")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        res = run_python(code, isolation=level)
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()[0].close()
    assert res.status == "error" and "connected" not in res.stdout, res
    assert "Network is unreachable" in res.stderr or "Connection refused" in res.stderr, res.stderr


def test_killing_its_parent_spares_the_caller(level):
    res = run_python("import os\ntry:\n    os.kill(os.getppid(), 9)\nexcept OSError as e:\n    print(type(e).__name__)",
                     isolation=level)
    assert res.status in ("ok", "error", "killed"), res  # its parent is the supervisor: never this process
    assert run_python("print('still fine')", isolation=level).stdout == "still fine\n"


def test_killing_every_ancestor_spares_the_caller(level):
    _needs(level, "processes")
    code = ("import os, signal\npid, hit = os.getpid(), []\nwhile pid > 1:\n"
            "    pid = int([l for l in open(f'/proc/{pid}/status') if l.startswith('PPid:')][0].split()[1])\n"
            "    if pid == 0:\n        break\n    try:\n        os.kill(pid, signal.SIGKILL)\n        hit.append(pid)\n"
            "    except OSError:\n        pass\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
            "print('killed', hit)\n")
    res = run_python(code, isolation=level)
    # every ancestor refused the signal (EPERM) or ignored it (a pid namespace's init); this test process still runs
    assert res.status == "ok" and res.stdout.startswith("killed") and "[sandbox]" not in res.stderr, res
    assert res.cpu_s > 0  # the supervisor survived to report the code's usage


def test_bad_arguments_refused():
    with pytest.raises(ValueError, match="timeout_s=0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_bytes=1024"):
        run_python("pass", memory_bytes=1024)
    with pytest.raises(ValueError, match="isolation='chroot'"):
        run_python("pass", isolation="chroot")
    missing = [name for name in LEVELS if sandbox.unavailable_reason(name) is not None]
    if missing:
        with pytest.raises(ValueError, match="not available on this machine"):
            run_python("pass", isolation=missing[0])
