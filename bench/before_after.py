"""Two revisions of driftscope side by side, interleaved in one sitting: did a change (a refactor, say) move the speed?

    python bench/before_after.py REV [--rounds 4] [--threads 1]

REV (any git revision) is built once, non-editable, into bench/.cache/rev-<sha>/ (a git worktree plus
`pip install --target`); the working tree is the other side, through the editable install. Each round runs every
workload once per side, in a fresh process each (A B B A order in odd rounds, B A A B in even ones, so drift in the
machine's speed falls on both sides alike), and times only the workload inside the process (not imports, not
set-up). It prints, per workload, each side's median seconds and the median of the per-round ratios REV / working
tree (> 1: the working tree is faster) with their spread, plus the load average before and after: record them in
bench/RESULTS.md with the machine.

Workloads use only the public API (`driftscope.drift`, `driftscope.generate`, `driftscope.vocab_probe`), so any
revision since the API settled runs them:
- drift: lockstep drift of a tiny random Qwen3 pair (hidden 256, 4 layers) at the real vocabulary size V = 151,936
  over the first 3 real MATH500 responses (../shared/data), streaming PCA;
- generate: greedy decoding of 8 prompts x 64 new tokens on the same base model;
- vocab_probe: one cpp call, N = 512, d = 256, V = 151,936, one tuned head;
- pairs: one cpp `vocab_probe_pairs` call over the logit lens's sources at one index (base and tuned outputs, base
  and tuned lens logits: 4 sources, N = 512, d = 256, V = 151,936) and its 4 pairs (output, cross, two self pairs);
- lens: the drift workload with `lens="every:4"`, pca="none", no report;
- generate_real: the generation peers' workload (bench/peers: SmolLM2-135M-Instruct, 16 chat prompts x 128 greedy
  tokens, EOS ignored), in-process; build the weights first with `python -m bench.peers.weights 1`.

`--policy PASSIVE` sets OMP_WAIT_POLICY in every process (the `driftscope` command's own default; unset otherwise);
`--busy` keeps one busy-loop process running through the rounds (a machine shared with another job).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"

WORKLOAD = r"""
import json, sys, time
from pathlib import Path
import torch
import driftscope
kind, base, tuned, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
if kind == "drift":
    t0 = time.perf_counter()
    driftscope.drift(base, tuned, data, progress=False, max_batch_tokens=4096, pca="streaming")
elif kind == "generate":
    prompts = [f"Question {i}: what is {i} + {2 * i}? Answer:" for i in range(8)]
    t0 = time.perf_counter()
    driftscope.generate(base, prompts, max_new_tokens=64, temperature=0.0)
elif kind == "generate_real":
    msgs = [json.loads(line)["messages"] for line in open(data)]
    model = driftscope.load_model(base, device="cpu", dtype="float32")
    kw = dict(tokenizer=base, temperature=0.0, chat=True, ignore_eos=True, progress=False)
    driftscope.generate(model, msgs[:2], max_new_tokens=4, **kw)  # warm-up
    t0 = time.perf_counter()
    driftscope.generate(model, msgs, max_new_tokens=128, **kw)
elif kind == "lens":
    t0 = time.perf_counter()
    driftscope.drift(base, tuned, data, progress=False, max_batch_tokens=4096, pca="none", report=False,
                     lens="every:4")
elif kind == "pairs":
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(512, 256, generator=g) for _ in range(4)]
    ws = [torch.randn(151936, 256, generator=g) / 16 for _ in range(2)]
    y = torch.randint(0, 151936, (512,), generator=g)
    src, pairs = [(hs[0], ws[0]), (hs[1], ws[1]), (hs[2], ws[0]), (hs[3], ws[1])], [(0, 1), (2, 3), (0, 2), (1, 3)]
    with driftscope.use_backend("cpp"):
        driftscope.vocab_probe_pairs(src, pairs, y)  # warm: buffers, OpenMP pool
        t0 = time.perf_counter()
        driftscope.vocab_probe_pairs(src, pairs, y)
else:
    g = torch.Generator().manual_seed(0)
    hb, ht = torch.randn(512, 256, generator=g), torch.randn(512, 256, generator=g)
    wb, wt = torch.randn(151936, 256, generator=g) / 16, torch.randn(151936, 256, generator=g) / 16
    y = torch.randint(0, 151936, (512,), generator=g)
    with driftscope.use_backend("cpp"):
        driftscope.vocab_probe(hb, wb, ht, wt, y)  # warm: buffers, OpenMP pool
        t0 = time.perf_counter()
        driftscope.vocab_probe(hb, wb, ht, wt, y)
print(json.dumps({"seconds": time.perf_counter() - t0, "driftscope": driftscope.__file__}))
"""


def _sh(*cmd: str, cwd: Path = ROOT) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def build(rev: str) -> Path:
    """bench/.cache/rev-<sha>/site: REV installed non-editable (its own compiled _C)."""
    sha = _sh("git", "rev-parse", "--short=12", rev)
    site = CACHE / f"rev-{sha}" / "site"
    if (site / "driftscope").is_dir():
        return site
    tree = CACHE / f"rev-{sha}" / "src"
    if tree.exists():
        shutil.rmtree(tree)
    subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), sha], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                        str(site), str(tree)], check=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    return site


def fixtures() -> tuple[Path, Path, Path]:
    """The bench-drift pair and data (written once, by the working tree's driftscope.testing)."""
    root = CACHE / "fixtures"
    if (root / "math500.jsonl").is_file():
        return root / "base", root / "tuned", root / "math500.jsonl"
    sys.path.insert(0, str(ROOT / "bench"))
    from drift_workloads import write_pair

    return write_pair(root, 3)


def real_fixtures() -> list[str]:
    """generate_real's arguments: the peers' real base model and its chat prompts (base, base, prompts)."""
    sys.path.insert(0, str(ROOT))
    from bench.peers import weights, workloads

    return [str(weights.base_hf()), str(weights.base_hf()), str(workloads.gen_prompts())]


def run_once(site: Path | None, kind: str, args: list[str], threads: int, policy: str | None = None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **({"OMP_WAIT_POLICY": policy} if policy else {})}
    if site is None:  # the working tree, through the editable install
        cmd = [sys.executable, "-c", WORKLOAD]
    else:  # -S: no site hooks, so the editable install's finder cannot shadow the revision's copy
        path = [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        cmd = [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {path!r}\n" + WORKLOAD]
    out = subprocess.run([*cmd, kind, *args], env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    expect = str(site) if site is not None else str(ROOT)
    assert result["driftscope"].startswith(expect), f"ran {result['driftscope']}, expected a copy under {expect}"
    return result["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the revision to compare the working tree with (e.g. HEAD~5)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every process (default 1)")
    ap.add_argument("--workloads", default="drift,generate,vocab_probe")
    ap.add_argument("--policy", default=None, help="OMP_WAIT_POLICY for every process (default: unset)")
    ap.add_argument("--busy", action="store_true", help="one busy-loop process beside the rounds")
    a = ap.parse_args()
    site = build(a.rev)
    args = [str(p) for p in fixtures()]
    kinds = a.workloads.split(",")
    real = real_fixtures() if "generate_real" in kinds else None
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.busy else None
    if busy is not None:
        atexit.register(busy.kill)  # also when a round fails
    load0 = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {k: {"rev": [], "tree": []} for k in kinds}
    for r in range(a.rounds):
        for kind in kinds:
            order = ["rev", "tree", "tree", "rev"] if r % 2 == 0 else ["tree", "rev", "rev", "tree"]
            got: dict[str, list[float]] = {"rev": [], "tree": []}
            for side in order:
                got[side].append(run_once(site if side == "rev" else None, kind,
                                          real if kind == "generate_real" else args, a.threads, a.policy))
            for side in got:
                times[kind][side].append(statistics.mean(got[side]))
    load1 = os.getloadavg()
    print(f"{a.rev} ({_sh('git', 'rev-parse', '--short=12', a.rev)}) vs the working tree, {a.rounds} rounds, "
          f"OMP_NUM_THREADS={a.threads}, OMP_WAIT_POLICY={a.policy or 'unset'}{', one busy process' if busy else ''}, "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}")
    for kind in kinds:
        ratios = [b / t for b, t in zip(times[kind]["rev"], times[kind]["tree"])]
        print(f"  {kind:12s} rev {statistics.median(times[kind]['rev']):7.3f} s  tree "
              f"{statistics.median(times[kind]['tree']):7.3f} s  ratio rev/tree {statistics.median(ratios):.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
