"""What a run records about where it ran and how it went: package versions, CPU/GPU, GPU telemetry via
nvidia-ml-py, stage times, and progress lines."""
from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata

import torch


def versions() -> dict:
    """Python's, torch's and the installed versions of the packages a run's numbers depend on (None: not installed).
    A package not imported yet is read from its metadata, not imported: triton's import alone took 0.5 s of a
    summary on a CPU-only machine."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("driftscope", "numpy", "safetensors", "tokenizers", "triton", "flash_attn"):
        if name in sys.modules:
            out[name] = getattr(sys.modules[name], "__version__", "unknown")
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "gpu": None,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}  # torch_threads: see cli.py
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class StageTimes:
    """Wall seconds per stage of a run, exclusive: a stage timed inside another is not counted in the outer one.
    On CUDA a stage ends with a synchronize, so its time is its own work, not the queue's. `start`: when the run
    began (time.perf_counter(); default now); `summary(until)` adds "other", the wall seconds since then that no
    stage covers, so the stages add up to the run's wall time."""

    def __init__(self, device: torch.device | str = "cpu", start: float | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter() if start is None else start
        self._sync = torch.device(device).type == "cuda"
        self._inner = [0.0]  # per open stage: seconds spent in stages nested in it

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
            inner = self._inner.pop()
            self._inner[-1] += total
            self.seconds[name] = self.seconds.get(name, 0.0) + total - inner

    def wall(self, until: float | None = None) -> float:
        """Seconds from `start` to `until` (default now)."""
        return (time.perf_counter() if until is None else until) - self.start

    def summary(self, until: float | None = None) -> dict[str, float]:
        """{stage: seconds} rounded to 0.1 ms; with `until` (a perf_counter time after every stage closed) also
        "other" = wall(until) − Σ stages, never below 0."""
        out = {k: round(v, 4) for k, v in self.seconds.items()}
        if until is not None:
            out["other"] = round(max(self.wall(until) - sum(self.seconds.values()), 0.0), 4)
        return out


def process_seconds() -> float | None:
    """Wall seconds since this process started (Linux: /proc/self/stat's start time against /proc/uptime), imports
    and set-up included; None where /proc is not available."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the parenthesized name
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


class GpuTelemetry:
    """Samples NVML at start/end (and on `sample()`): memory, utilization, power; None when not on CUDA or no NVML."""

    def __init__(self, device: torch.device):
        self.samples: list[dict] = []
        self.reason: str | None = None
        self._handle = None
        if device.type != "cuda":
            self.reason = "not on CUDA"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as exc:  # missing package or driver: telemetry is optional, say why
            self.reason = f"nvidia-ml-py unavailable: {type(exc).__name__}: {exc}"

    def sample(self) -> None:
        if self._handle is None:
            return
        n, h = self._nvml, self._handle
        mem = n.nvmlDeviceGetMemoryInfo(h)
        util = n.nvmlDeviceGetUtilizationRates(h)
        self.samples.append({
            "t": time.time(), "memory_used_mb": mem.used / 2**20, "gpu_util_pct": util.gpu,
            "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
        })

    def summary(self) -> dict | None:
        if self._handle is None:
            return {"available": False, "reason": self.reason}
        peak = torch.cuda.max_memory_allocated() / 2**20
        return {"available": True, "samples": self.samples, "torch_peak_allocated_mb": peak}


def note(message: str, enabled: bool = True) -> None:
    """One status line on stderr (the progress channel), e.g. while models load; silent when disabled."""
    if enabled:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


class Progress:
    """A one-line progress bar on stderr when it is a terminal; else (a log file) a plain line at the first unit, every
    PLAIN_EVERY_S seconds and at the end, never a `\r` frame. Silent when disabled (None: on a terminal only). `done`
    units were done before this process started (a resumed run): they count towards the fraction, never towards the
    rate or the ETA, which measure this process's work only. Nothing is drawn before the first unit of this process's
    work. `update` is `advance`, for the generation engine."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, total_tokens: int, label: str, enabled: bool | None = True, unit: str = "tok", done: int = 0):
        self.tty = sys.stderr.isatty()
        self.total, self.label, self.unit = max(total_tokens, 1), label, unit
        self.enabled = self.tty if enabled is None else enabled
        self.done = self.resumed = done
        self.t0 = time.perf_counter()
        self.shown: float | None = None  # when the last plain line was written

    def line(self) -> str:
        dt, ran, u = time.perf_counter() - self.t0, self.done - self.resumed, self.unit
        rate = ran / dt if dt > 0 and ran > 0 else None
        frac = min(self.done / self.total, 1.0)
        speed = f"{rate:,.0f} {u}/s, eta {max(self.total - self.done, 0) / rate:,.0f} s" if rate else "eta --"
        resumed = f" ({self.resumed} {u} resumed)" if self.resumed else ""
        return f"{self.label} [{'#' * int(frac * 30):<30}] {frac:6.1%} {self.done}/{self.total} {u}{resumed}, {speed} "

    def advance(self, tokens: int) -> None:
        self.done += tokens
        now = time.perf_counter()
        if not self.enabled or not (self.tty or self.shown is None or now - self.shown >= self.PLAIN_EVERY_S
                                    or self.done >= self.total):
            return
        sys.stderr.write("\r" + self.line() if self.tty else self.line().rstrip() + "\n")
        sys.stderr.flush()
        self.shown = now

    update = advance

    def close(self) -> None:
        if self.enabled and self.tty and self.done > self.resumed:
            sys.stderr.write("\n")
            sys.stderr.flush()
