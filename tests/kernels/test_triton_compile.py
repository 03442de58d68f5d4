"""Every Triton kernel configuration the launchers use on CUDA compiles for sm_90 (H100/H200) on this CPU machine.

The table of configurations is `bench/aot_resources.py:configs()`, built from the launchers' own constants (block
sizes, num_warps, TOPK, the panel rows) and specialized as a launch would be (pointer dtypes per input dtype, the
paper's N = 16384, d = 5120, V = 151,936 as i32 scalars divisible by 16). Triton compiles for GPUTarget("cuda", 90,
32) without a device: lowering, layouts, shared memory and ptxas all run, so GPU-only compile errors show up here,
which TRITON_INTERPRET=1 never catches. The compiles run in one fresh process (`bench/aot_resources.py --json`):
under the kernel tests' TRITON_INTERPRET=1, @triton.jit kernels are defined as interpreted functions, which cannot
be compiled. The launched-by-default configurations (both models in one dtype) run in CI; mixed-dtype pairs and
upcasts are `slow`. Each test prints its row of the resource table (pytest -s, or run the script for all of it).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "aot_resources.py"
# Spill instructions allowed inside a kernel's innermost loops (its k-loops). Today's worst is ~600 (the fp32 FMA
# paths, which run out of registers at 64x128x64); the pipelined upcast loop that tl.range(num_stages=1) in
# triton_tile fixed had 8,000-12,000, ptxas down to 32 registers: a k-loop made mostly of spills fails here.
HOT_SPILL_BUDGET = 1024

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("triton's NVIDIA backend is not installed: cannot compile for sm_90", allow_module_level=True)


def _load_script():
    spec = importlib.util.spec_from_file_location("aot_resources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


aot = _load_script()
CONFIGS = aot.configs()


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> dict[str, dict]:
    """The rows of the configurations selected in this session, compiled in one fresh process without the
    interpreter (TRITON_INTERPRET removed from its environment)."""
    wanted = [item.callspec.params["cfg"].id for item in request.session.items
              if item.module is request.module and "cfg" in getattr(getattr(item, "callspec", None), "params", {})]
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--ids", *wanted], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    if not out.is_file():
        pytest.fail(f"{SCRIPT.name} wrote no rows (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result["unavailable"]:
        pytest.skip(result["unavailable"])
    return {row["id"]: row for row in result["rows"]}


@pytest.mark.parametrize("cfg", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                 for c in CONFIGS])
def test_compiles_for_sm90(cfg, compiled, record_property):
    row = compiled[cfg.id]
    assert "error" not in row, f"{cfg.id} does not compile for sm_90 (launch {cfg.constexprs}, {cfg.options}):\n" \
                               f"{row['error']}"
    for key in ("regs", "spill_stores", "spill_loads", "spill_ins_inner", "shared", "blocks_per_sm", "occupancy"):
        record_property(key, row[key])
    print("\n" + aot.table([row]))
    limit = aot.SM90["smem_per_block"]
    assert row["shared"] <= limit, f"{cfg.id} needs {row['shared']} bytes of shared memory, sm_90 has {limit}"
    assert row["blocks_per_sm"] >= 1, f"{cfg.id} cannot be resident on an sm_90 SM: {row}"
    assert row["spill_ins_inner"] <= HOT_SPILL_BUDGET, \
        f"{cfg.id}: {row['spill_ins_inner']} spill instructions inside its innermost loops ({row['regs']} registers," \
        f" {row['spill_stores']}/{row['spill_loads']} bytes of spill stores/loads): the k-loop runs from local memory"


def _triton_kernels() -> set[str]:
    """module:name of every @triton.jit function in driftscope named *_kernel (the launched ones; helpers such as
    `_logits_tile` are compiled inside them)."""
    found = set()
    for path in (ROOT / "driftscope").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                found.add(f"{module}:{node.name}")
    return found


def test_table_covers_every_kernel():
    """A new kernel gets rows in the table; every kernel has a launched-by-default row (run in CI)."""
    assert {c.kernel for c in CONFIGS} == _triton_kernels()
    assert len({c.id for c in CONFIGS}) == len(CONFIGS)
    for kernel in {c.kernel for c in CONFIGS}:
        assert any(not c.slow and c.kernel == kernel for c in CONFIGS), f"{kernel} has no launched-by-default row"


def test_occupancy_arithmetic():
    """The sm_90 occupancy rule the table reports: 255 registers x 8 warps fill the register file once."""
    assert aot.occupancy(255, 72 * 1024, 8)["blocks_per_sm"] == 1
    assert aot.occupancy(118, 0, 4) == {"blocks_per_sm": 4, "limit": "regs", "warps_per_sm": 16, "occupancy": 0.25}
    assert aot.occupancy(24, 0, 4)["limit"] == "threads"
    assert aot.occupancy(64, 100 * 1024, 4)["blocks_per_sm"] == 2  # 228 KiB per SM, 1 KiB reserved per block
