"""The README's walkthrough and Python API run exactly as written, and help(driftscope.drift) lists the options.

The blocks marked `<!-- readme-test -->` (bash), `<!-- readme-test: needs ../shared/data -->` (bash) and
`<!-- readme-test: python -->` run in a temporary copy of the layout the README assumes: a clone folder holding
`.venv` (a link to this checkout's) where `make demo`'s recipe has run, with `../shared` beside it (a link to the
shared data folder when there is one). Nothing is written into the repository.
"""
from __future__ import annotations

import inspect
import os
import pydoc
import re
import subprocess
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

import driftscope
from driftscope.drift_run.options import DriftOptions

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
BLOCK = re.compile(r"<!-- readme-test(?:: (?P<tag>[^>]*?))? -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)


def _blocks() -> dict[str, tuple[str, str]]:
    """tag -> (language, code) of every marked block ('' for the untagged one)."""
    found = [(m["tag"] or "", m["lang"], m["body"]) for m in BLOCK.finditer(README.read_text(encoding="utf-8"))]
    tags = [t for t, _, _ in found]
    assert len(set(tags)) == len(tags), f"README: readme-test tags used twice: {tags}"
    return {t: (lang, body) for t, lang, body in found}


def _flat(text: str) -> str:
    return " ".join(text.split())


def _quoted(prefixes: tuple[str, ...]) -> list[str]:
    """The README's quoted output lines (`...` spans, whitespace joined) that start with one of `prefixes`."""
    prose = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    return [q for q in re.findall(r"`([^`]+)`", _flat(prose)) if q.startswith(prefixes)]


DECIMAL = re.compile(r"-?\d+\.\d+")


def _printed(quote: str, out: str) -> bool:
    """Whether the flattened output `out` holds the README's `quote` as printed on another CPU: the same words and
    integers (counts), each decimal within 1% of the quoted one or one unit of its last digit. A rank counts the
    logits above the target's, so at near-ties it follows the BLAS's rounding (0.326 vs 0.328 rank shift on a Zen 4
    MKL against the Zen 3 and Intel ones); an exact-text comparison held by luck of the machine."""
    pattern = r"(-?\d+\.\d+)".join(re.escape(p) for p in DECIMAL.split(quote))
    decimals = DECIMAL.findall(quote)
    allowed = [max(0.01 * abs(float(x)), 10.0 ** -len(x.split(".")[1])) + 1e-12 for x in decimals]
    return any(all(abs(float(g) - float(w)) <= a for g, w, a in zip(m.groups(), decimals, allowed))
               for m in re.finditer(pattern, out))


def _make_recipe(target: str) -> str:
    """The shell lines of a Makefile target's recipe, with $(VENV) as the Makefile sets it."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line[1:].replace("$(VENV)", ".venv"))
    return "\n".join(recipe)


def _run(cmd: list[str], cwd: Path, env: dict, what: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{what} failed with exit code {r.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, dict]:
    """(the clone folder after `make demo`, the environment of a shell where .venv is activated)."""
    venv = ROOT / ".venv"
    if not (venv / "bin" / "driftscope").is_file():
        pytest.skip(".venv/bin/driftscope is missing: `make demo` creates it")
    top = tmp_path_factory.mktemp("readme")
    (top / "clone").mkdir()
    (top / "clone" / ".venv").symlink_to(venv, target_is_directory=True)
    if SHARED.is_dir():
        (top / "shared").symlink_to(SHARED, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.setdefault("OMP_NUM_THREADS", "1")
    venv_bins = {str(venv / "bin"), os.path.realpath(venv / "bin")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in venv_bins)
    out = _run(["bash", "-ec", _make_recipe("demo")], top / "clone", env, "make demo's recipe")
    assert (top / "clone" / "demo-out" / "report.html").is_file(), out[-2000:]
    return top / "clone", env


def _activated(env: dict) -> dict:
    """`env` as `source .venv/bin/activate` leaves it."""
    venv = ROOT / ".venv"
    return {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}


def test_walkthrough_drift_and_generate(clone):
    """The first block starts in a shell without .venv on PATH: its own first line must make `driftscope` work."""
    cwd, env = clone
    lang, code = _blocks()[""]
    assert lang == "bash"
    out = _run(["bash", "-e", "-c", code], cwd, env, "the README's first walkthrough block")
    first = cwd / "first"
    rows = (first / "responses.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all('"output_token_ids"' in r for r in rows)
    for name in ("summary.json", "report.html", "pca_shift.json"):
        assert (first / "drift" / name).is_file(), name
    quoted = _quoted(("tuned / math:", "4 responses ->"))
    assert len(quoted) == 2, quoted
    for q in quoted:  # what the README says these commands print is what they print
        assert _printed(q, _flat(out)), f"README quotes {q!r}; the commands printed:\n{out[-3000:]}"


def test_walkthrough_eval_and_ti(clone):
    cwd, env = clone
    if not (SHARED / "data" / "benchmarks").is_dir():
        pytest.skip(f"{SHARED / 'data'} is missing: the README's eval and ti commands read ../shared/data")
    lang, code = _blocks()["needs ../shared/data"]
    assert lang == "bash"
    out = _run(["bash", "-e", "-c", code], cwd, _activated(env), "the README's eval walkthrough block")
    first = cwd / "first"
    for d in ("eval-base", "eval-tuned"):
        assert (first / d / "scores.json").is_file() and (first / d / "lm_eval" / "ds_mctaco.json").is_file(), d
    assert (first / "ti" / "ti.json").is_file() and (first / "ti" / "ti.html").is_file()
    assert (first / "grade-rl" / "scores.json").is_file()
    quoted = _quoted(("gpqa_diamond:",))
    assert len(quoted) == 1 and _printed(quoted[0], _flat(out)), (quoted, out[-3000:])


def test_python_api_block(clone):
    cwd, env = clone
    lang, code = _blocks()["python"]
    assert lang == "python"
    (cwd / "readme_api.py").write_text(code)
    _run([str(cwd / ".venv" / "bin" / "python"), "readme_api.py"], cwd, _activated(env), "the README's Python API")


def test_printed_matches_words_and_counts_exactly_decimals_within_tolerance():
    q = "tuned / math: 864 tokens, KL 0.00942, rank shift 0.328, top-1 agreement 30.9%"
    assert _printed(q, "x " + q + " y")
    assert _printed(q, q.replace("0.328", "0.326").replace("30.9%", "31.0%"))
    assert not _printed(q, q.replace("0.328", "0.338"))  # 3% off
    assert not _printed(q, q.replace("0.00942", "0.00952"))  # 1.1% and 10 last-digit units off
    assert not _printed(q, q.replace("864", "865"))  # counts are exact
    assert not _printed(q, q.replace("rank shift", "rank shifts"))


def test_help_of_drift_lists_every_option():
    doc = pydoc.render_doc(driftscope.drift, renderer=pydoc.plaintext)
    for f in fields(DriftOptions):
        default = f.default_factory() if f.default is MISSING else f.default
        help_text = f.metadata["cli"]["help"]
        assert f"{f.name}={default!r}" in doc and help_text in doc, f"help(driftscope.drift) lacks {f.name}"


def test_help_of_generate_names_every_parameter():
    doc = driftscope.generate.__doc__
    missing = [p for p in inspect.signature(driftscope.generate).parameters if f"{p}:" not in doc]
    assert not missing, f"driftscope.generate's docstring does not explain {missing}"

