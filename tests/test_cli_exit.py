"""The console script's exit (cli.exit_fast): the code, the streams and the atexit handlers as in a normal exit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import atexit, sys, threading, time\n"
                           "from driftscope.cli import exit_fast\n" + body], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("code", [0, 2, 130])
def test_exit_fast_keeps_the_code_the_buffered_output_and_the_atexit_handlers(code):
    r = _run("atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
             "sys.stdout.write('x' * 100000 + ' end')\n"  # buffered, not flushed: exit_fast must flush it
             f"exit_fast({code})")
    assert r.returncode == code
    assert r.stdout.endswith("x end") and len(r.stdout) == 100004
    assert r.stderr == "handler ran\n"


def test_exit_fast_joins_a_running_thread_as_a_normal_exit_does():
    r = _run("threading.Thread(target=lambda: (time.sleep(0.3), print('thread finished'))).start()\n"
             "exit_fast(3)")
    assert r.returncode == 3 and r.stdout == "thread finished\n"


def test_the_console_script_and_python_m_exit_through_exit_fast():
    root = Path(__file__).resolve().parents[1]
    assert 'driftscope = "driftscope.cli:command"' in (root / "pyproject.toml").read_text()
    assert "command()" in (root / "driftscope" / "__main__.py").read_text()
    r = subprocess.run([sys.executable, "-m", "driftscope", "no-such-command"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no-such-command" in r.stderr
