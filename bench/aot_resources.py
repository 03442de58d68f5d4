"""Ahead-of-time compile of every Triton kernel configuration the launchers use on CUDA, for sm_90 (H100/H200),
without a GPU: registers per thread, spills, shared memory and what they imply for occupancy.

Usage: python bench/aot_resources.py [--all] [--ids ID ...] [--json PATH|-] [-j JOBS]
  (default: the configurations launched by default; --all adds the `slow` ones: mixed-dtype pairs, upcasts)
The table below (`configs`) is built from the launchers' own constants (block sizes, num_warps, TOPK, the panel
rows), and each configuration is specialized exactly as a launch would specialize it (Triton's own binder on
stand-in arguments: the pointer dtypes the launcher passes, the paper's N = 16384, d = 5120, V = 151,936 as i32
scalars divisible by 16), then compiled with `triton.compile` for GPUTarget("cuda", 90, 32). Registers and spills
come from ptxas -v (the ptxas Triton itself runs for sm_90, with its flags) on the kernel's PTX.
tests/kernels/test_triton_compile.py runs this file in a fresh process (the kernel tests' TRITON_INTERPRET=1 makes
@triton.jit functions interpreted ones, which cannot be compiled) and checks every row.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # @triton.jit reads TRITON_INTERPRET when a kernel is defined: before the imports
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402  (before driftscope: a CPU process without TRITON_INTERPRET imports it only then)

from driftscope.kernels.vocab_probe import triton_fold, triton_fused, triton_panel  # noqa: E402

N, D, V = 16384, 5120, 151_936  # the paper's shape: tokens, hidden size, vocabulary
SM90 = dict(regs_per_sm=65536, threads_per_sm=2048, warps_per_sm=64, blocks_per_sm=32, smem_per_sm=228 * 1024,
            smem_per_block=227 * 1024, smem_reserved_per_block=1024, reg_alloc_unit=256, max_regs_per_thread=255)
ARCH = ("cuda", 90, 32)

cov_update = importlib.import_module("driftscope.kernels.cov_update")  # the package re-exports the function's name
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
       "i64": torch.int64, "i32": torch.int32}


@dataclass(frozen=True)
class Config:
    """One launch: kernel `module:name`, positional argument stand-ins ("*dtype" pointers or ints), constexprs
    and launch options (num_warps, num_stages) as the launcher passes them; `slow`: not launched by default."""
    id: str
    kernel: str
    args: tuple
    constexprs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    slow: bool = False


def _model_operands(h: str, w: str) -> tuple[str, str, bool]:
    """(h pointer dtype, w pointer dtype, UPCAST) of one model as `vocab_probe_fused` passes them on CUDA: mixed
    dtypes are multiplied in fp32, h upcast by the launcher (h.float()) and w in the kernel."""
    up = h != w
    return ("fp32" if up else h), w, up


# (h dtype, w dtype) per model. Default: both models in one dtype; slow: the upcast pairs and one mixed pair.
_PAIRS_DEFAULT = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")]
_PAIRS_SLOW = [("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "fp32")]


def configs() -> list[Config]:
    out = []
    # panel fold: fp32 panels whatever the input dtype; r0 = a later panel's first row, ld = V padded
    fold_launch = {"num_warps": triton_fold.CUDA_NUM_WARPS}
    rows = triton_panel.vocab_path("cpu", N, V).rows
    ld = -(-V // triton_panel._LD_MULTIPLE) * triton_panel._LD_MULTIPLE
    for has_t in (True, False):
        out.append(Config(
            f"fold-fp32-{'targets' if has_t else 'notargets'}-v{triton_fold.CUDA_BLOCK_V}",
            "driftscope.kernels.vocab_probe.triton_fold:_panel_fold_kernel",
            ("*fp32", "*fp32", "*i64", "*fp32", "*i64", rows, N, V, ld),
            dict(HAS_TARGETS=has_t, BLOCK_V=triton_fold.CUDA_BLOCK_V), fold_launch))
    # fused scan and recount: both take the launcher's CUDA blocks and num_warps
    bn, bv, bd = triton_fused.CUDA_BLOCKS
    blocks = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd)
    launch = {"num_warps": triton_fused.CUDA_NUM_WARPS}
    tag = f"{bn}x{bv}x{bd}"
    pairs = [(p, p, False) for p in _PAIRS_DEFAULT] + [(p, p, True) for p in _PAIRS_SLOW]
    pairs.append((("bf16", "bf16"), ("fp32", "fp32"), True))  # base and tuned heads in different dtypes
    for base, tuned, slow in pairs:
        hb, wb, up_b = _model_operands(*base)
        ht, wt, up_t = _model_operands(*tuned)
        name = "-".join(dict.fromkeys(("x".join(base), "x".join(tuned))))  # "bf16xbf16" or "bf16xbf16-fp32xfp32"
        ptrs = (f"*{hb}", f"*{wb}", f"*{ht}", f"*{wt}", "*i64")
        sizes = (N, V, D, D, D, D, D, D)
        common = dict(UPCAST_B=up_b, UPCAST_T=up_t, **blocks)
        for has_t in (True, False):
            t = "targets" if has_t else "notargets"
            out.append(Config(f"fused-{name}-{t}-{tag}", "driftscope.kernels.vocab_probe.triton_fused:"
                              "_vocab_probe_kernel", (*ptrs, "*fp32", "*i64", *sizes),
                              dict(HAS_TARGETS=has_t, TOPK=triton_fused.TOPK, **common), launch, slow))
        for has_t, rec_t in ((True, True), (True, False), (False, False)):
            t = ("targets-tuned" if rec_t else "targets") if has_t else "notargets"
            out.append(Config(f"recount-{name}-{t}-{tag}", "driftscope.kernels.vocab_probe.triton_recount:"
                              "_vocab_probe_recount_kernel",
                              (*ptrs, "*i64", "*i32", "*fp32", "*i64", "*fp32", *sizes),
                              dict(HAS_TARGETS=has_t, RECOUNT_TUNED=rec_t, **common), launch, slow))
    # covariance update: x [N, d] in each accepted dtype, the default num_warps / num_stages
    for x in ("fp32", "bf16", "fp16", "fp64"):
        tc = x in ("bf16", "fp16")
        bk = cov_update.TC_ROWS if tc else cov_update.FP64_ROWS
        out.append(Config(f"cov-{x}-d{cov_update.BLOCK_D}-k{bk}", "driftscope.kernels.cov_update:_cov_update_kernel",
                          (f"*{x}", "*fp64", "*fp64", N, D, D),
                          dict(BLOCK_D=cov_update.BLOCK_D, BLOCK_K=bk, TENSOR_CORES=tc, UPCAST=False)))
    return out


def _stand_in(a):
    return torch.empty(16, dtype=_DT[a[1:]]) if isinstance(a, str) else a  # 16-byte aligned, like CUDA allocations


def occupancy(regs: int, shared: int, num_warps: int) -> dict:
    """Resident programs (blocks) per SM on sm_90 and the limiting resource."""
    s = SM90
    per_warp = -(-regs * 32 // s["reg_alloc_unit"]) * s["reg_alloc_unit"]
    by = {"regs": (s["regs_per_sm"] // per_warp) // num_warps,
          "smem": s["smem_per_sm"] // (shared + s["smem_reserved_per_block"]),
          "threads": s["threads_per_sm"] // (32 * num_warps), "blocks": s["blocks_per_sm"]}
    limit = min(by, key=by.get)
    return {"blocks_per_sm": by[limit], "limit": limit, "warps_per_sm": by[limit] * num_warps,
            "occupancy": by[limit] * num_warps / s["warps_per_sm"]}


def _ptxas_stats(ptx: str, enable_fp_fusion: bool) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        fmad = [] if enable_fp_fusion else ["--fmad=false"]
        cmd = [get_ptxas(ARCH[1]).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(ARCH[1])}", str(src), "-o", str(Path(tmp) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


_F64 = re.compile(r"^(@!?U?P\w+ )?(D(FMA|ADD|MUL|SETP|MMA)|MUFU\.\w+64)")


def _sass_stats(cubin: bytes) -> dict:
    """Static counts in the cubin's SASS (nvdisasm): spill instructions (STL/LDL) in the innermost loops (the
    GEMM's k-loops: where a spill costs most), fp64 instructions in all and inside loops (a loop: the instructions
    from a label to a branch back to it; the one-instruction BRA after EXIT is no loop)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "k.cubin"
        binary.write_bytes(cubin)
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", str(binary)], capture_output=True, text=True,
                              check=True).stdout
    labels, ins = {}, []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            ins.append(m.group(1))
    loops = [(labels[m.group(1)], i) for i, x in enumerate(ins)
             if (m := re.search(r"BRA\b.*`\((\.L_x_\d+)\)", x)) and labels[m.group(1)] < i]
    inner = [(a, b) for a, b in loops if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in loops)]
    in_loop = {i for a, b in loops for i in range(a, b + 1)}
    in_inner = {i for a, b in inner for i in range(a, b + 1)}
    spill = [i for i, x in enumerate(ins) if re.search(r"\b(STL|LDL)\b", x)]
    f64 = [i for i, x in enumerate(ins) if _F64.match(x)]
    return {"sass": len(ins), "spill_ins": len(spill), "spill_ins_inner": sum(i in in_inner for i in spill),
            "f64_ins": len(f64), "f64_ins_loop": sum(i in in_loop for i in f64)}


def compile_config(cfg: Config) -> dict:
    """Compile one configuration for sm_90; the row of the table (or its error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    row = {"id": cfg.id, "slow": cfg.slow}
    t0 = time.perf_counter()
    try:
        module, name = cfg.kernel.split(":")
        kern = getattr(importlib.import_module(module), name)
        target = GPUTarget(*ARCH)
        backend = make_backend(target)
        kwargs = {**cfg.constexprs, **cfg.options}
        binder = create_function_from_signature(kern.signature, kern.params, backend)  # the launch's specializer
        bound, spec, opts = binder(*map(_stand_in, cfg.args), **kwargs)
        options, signature, constexprs, attrs = kern._pack_args(backend, kwargs, bound, spec, opts)
        ck = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=target, options=options.__dict__)
        md = ck.metadata
        row.update(num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                   signature=" ".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"))
        row.update(_ptxas_stats(ck.asm["ptx"], options.enable_fp_fusion))
        row.update(_sass_stats(ck.asm["cubin"]))
        row.update(occupancy(row["regs"], md.shared, md.num_warps))
    except Exception as exc:  # the table reports it; the test fails on it
        row["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def unavailable() -> str | None:
    """Why sm_90 cannot be compiled for here (None when it can)."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton or its NVIDIA backend is not installed ({exc})"
    if not Path(get_ptxas(ARCH[1]).path).is_file():
        return "triton's NVIDIA backend ships no ptxas"
    return None


def table(rows: list[dict]) -> str:
    w = max([44, *(len(r["id"]) for r in rows)])
    head = (f"{'kernel / configuration':<{w}} {'warps':>5} {'stg':>3} {'regs':>4} {'spill st/ld B':>13} "
            f"{'hot STL/LDL':>11} {'smem KiB':>8} {'blk/SM':>6} {'occup':>5} {'limit':>7} {'f64 loop/all':>12} "
            f"{'s':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['id']:<{w}} FAILED: {r['error'].splitlines()[0][:150]}")
            continue
        lines.append(f"{r['id']:<{w}} {r['num_warps']:>5} {r['num_stages']:>3} {r['regs']:>4} "
                     f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>13} {r['spill_ins_inner']:>11} "
                     f"{r['shared'] / 1024:>8.1f} {r['blocks_per_sm']:>6} {r['occupancy']:>5.0%} {r['limit']:>7} "
                     f"{str(r['f64_ins_loop']) + '/' + str(r['f64_ins']):>12} {r['compile_s']:>4.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="also the slow (not launched by default) configurations")
    p.add_argument("--ids", nargs="*", help="only these configuration ids")
    p.add_argument("--json", metavar="PATH", help="write {unavailable, rows} as JSON to PATH (- for stdout)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="compile in this many processes")
    a = p.parse_args(argv)
    why = unavailable()
    unknown = set(a.ids or ()) - {c.id for c in configs()}
    if unknown:
        p.error(f"unknown configuration ids: {sorted(unknown)}")
    cfgs = [c for c in configs() if (a.ids is not None and c.id in a.ids) or (a.ids is None and (a.all or not c.slow))]
    if why is not None:
        rows = []
    elif a.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(a.jobs) as pool:
            rows = list(pool.map(compile_config, cfgs))
    else:
        rows = [compile_config(c) for c in cfgs]
    if a.json:
        text = json.dumps({"unavailable": why, "rows": rows})
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text)
    else:
        print(why or table(rows))
        print("sm_90: 65,536 registers and 2,048 threads (64 warps) per SM, 227 KiB shared memory per block (228 per "
              "SM, 1 reserved per block). spill st/ld B: ptxas -v, static bytes per thread; hot STL/LDL: spill "
              "instructions inside innermost loops (the k-loops); f64: fp64 SASS instructions inside loops / all; "
              "blk/SM: resident programs per SM, limit: the resource that bounds them")
    return 0 if why is None and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
