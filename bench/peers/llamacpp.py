"""llama.cpp's `llama-perplexity` and `llama-batched-bench`, built from the llama.cpp that PyPI's llama-cpp-python
sdist vendors, into `~/.cache/driftscope/llama.cpp/<version>/` (DRIFTSCOPE_CACHE moves it).

    python -m bench.peers.llamacpp        # build (once; ~10 min on 2 cores) and print the binaries and the commit

The sdist is fetched with `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`; the build is
`cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release` and only the two targets, `-j2`. The vendored
llama.cpp commit is read from the sdist's git metadata and written to `build.json` beside the binaries.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is the one built
TARGETS = ("llama-perplexity", "llama-batched-bench")


def cache_dir(version: str = VERSION) -> Path:
    root = Path(os.environ.get("DRIFTSCOPE_CACHE") or Path.home() / ".cache" / "driftscope")
    return root / "llama.cpp" / version


def _commit(src: Path) -> str:
    """The vendored llama.cpp's commit, from the sdist's git metadata (`unknown` where the sdist has none)."""
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(version: str = VERSION, jobs: int = 2) -> dict:
    """The binaries' paths and the llama.cpp commit; builds them when `build.json` is absent."""
    out = cache_dir(version)
    record = out / "build.json"
    if record.is_file():
        return json.loads(record.read_text())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=out) as tmp_s:
        tmp = Path(tmp_s)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", str(tmp)], check=True)
        (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="fully_trusted")  # keeps the .git links the commit is read from
        src = tmp / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        commit = _commit(src)
        bdir = tmp / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(bdir), "-j", str(jobs), "--target", *TARGETS], check=True)
        bins = {}
        for t in TARGETS:
            dest = out / t
            shutil.copy2(bdir / "bin" / t, dest)
            bins[t] = str(dest)
    info = {"llama_cpp_python": version, "llama_cpp_commit": commit, "flags": "GGML_NATIVE=ON LLAMA_CURL=OFF Release",
            **bins}
    record.write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
