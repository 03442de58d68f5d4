"""Benchmark plumbing: every group has one baseline; the summary prints each variant's ratio to it.

Mark a benchmark's role with `benchmark.extra_info["role"] = "baseline"` (exactly one per group) and
give every variant the same `benchmark.group`. Ratios are time(baseline) / time(variant): > 1 is faster.
Peak-memory numbers, when a test records `extra_info["peak_extra_mb"]`, get the same treatment.
"""
from __future__ import annotations

import platform
import subprocess

import pytest


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not getattr(bs, "benchmarks", None):
        return
    groups: dict[str, list] = {}
    for b in bs.benchmarks:
        if b.has_error or not b.stats:
            continue
        groups.setdefault(b.group or "", []).append(b)
    tr = terminalreporter
    tr.write_sep("-", f"driftscope ratios vs baseline ({machine_line()})")
    for group, items in groups.items():
        base = [b for b in items if b.extra_info.get("role") == "baseline"]
        if len(base) != 1:
            continue
        t0 = base[0].stats.median
        m0 = base[0].extra_info.get("peak_extra_mb")
        tr.write_line(f"[{group}] baseline {base[0].name}: median {t0 * 1e3:.1f} ms"
                      + (f", peak extra {m0:.0f} MB" if m0 else ""))
        for b in items:
            if b is base[0]:
                continue
            line = f"  {b.name}: median {b.stats.median * 1e3:.1f} ms, speed-up x{t0 / b.stats.median:.2f}"
            m = b.extra_info.get("peak_extra_mb")
            if m and m0:
                line += f", peak extra {m:.0f} MB (x{m0 / m:.1f} less)"
            tr.write_line(line)


@pytest.fixture(scope="session")
def qwen3_100m(tmp_path_factory):
    """A random Qwen3 config of ≈100M parameters (hidden 768, 12 layers, vocab 32,000, tied head), saved as
    safetensors by transformers: the checkpoint of the engine and generation benchmarks."""
    transformers = pytest.importorskip("transformers")
    import torch

    cfg = transformers.Qwen3Config(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=1e6,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("qwen3-100m")
    model.save_pretrained(path, safe_serialization=True)
    return path
