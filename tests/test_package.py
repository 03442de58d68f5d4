"""The package imports, exposes its public API lazily and reports its backends."""
import json
import os

import torch

import driftscope
from driftscope.kernels import backend_status, use_backend
from driftscope.kernels._dispatch import OPS, forced_backend

import pytest


def test_backend_status_reports_every_backend_with_a_reason():
    st = backend_status()
    for name in ("triton", "cpp", "torch", "flash_attn"):
        assert name in st and st[name]["reason"]
    for op in ("vocab_probe", "cov_update", "attention", "paged_attention", "linear"):
        assert st["ops"][op]["cpu"]["runs"] in st["ops"][op]["cpu"] and "cuda" in st["ops"][op], st["ops"][op]
    assert st["torch"]["available"] is True
    assert st["cpp"]["available"] is True, st["cpp"]["reason"]  # the build must produce driftscope._C


def test_use_backend_forces_and_restores(monkeypatch):
    monkeypatch.delenv("DRIFTSCOPE_BACKEND", raising=False)
    assert OPS["vocab_probe"].select("cpu") == "cpp"
    with use_backend("torch"):
        assert forced_backend() == "torch" and OPS["vocab_probe"].select("cpu") == "torch"
    assert forced_backend() is None


def test_env_override_and_bad_name(monkeypatch):
    monkeypatch.setenv("DRIFTSCOPE_BACKEND", "torch")
    assert OPS["vocab_probe"].select("cpu") == "torch"
    monkeypatch.setenv("DRIFTSCOPE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="DRIFTSCOPE_BACKEND='cuda-magic'"):
        OPS["vocab_probe"].select("cpu")


def test_forced_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="unavailable"):
        OPS["vocab_probe"].select("cpu")


def test_unknown_public_name():
    with pytest.raises(AttributeError):
        driftscope.no_such_thing  # noqa: B018


def test_run_records_package_versions_without_importing_them():
    """summary.json's versions: the installed ones, read from metadata where a package is not imported yet (on a
    CPU-only machine nothing imports triton, and recording its version must not either)."""
    import subprocess
    import sys
    from importlib import metadata

    code = ("import json, sys; from driftscope.telemetry import versions; "
            "print(json.dumps([versions(), 'triton' in sys.modules]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    got, imported = json.loads(out)

    def installed(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    for name in ("driftscope", "safetensors", "tokenizers", "triton", "flash_attn"):
        assert got[name] == installed(name), (name, got[name])
    if not torch.cuda.is_available():
        assert not imported, "recording versions imported triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the triton backend imports triton")
def test_cpu_process_without_the_interpreter_never_imports_triton():
    """Nothing can run a Triton kernel there: the 0.16 s import is skipped, and the backend says why it is off."""
    import subprocess
    import sys

    code = ("import sys; import driftscope.engine.model; from driftscope.kernels._dispatch import triton_status; "
            "print('triton' in sys.modules, triton_status('cpu').reason)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False no CUDA device and TRITON_INTERPRET is not 1"
