"""LiveCodeBench code generation: pull the program out of a response and run it on a problem's tests in the sandbox.

`grade(response, doc) -> {"pass", "passed", "total", "status", ...}`; pass (pass@1 of one sample) is 1 when every
test passes. Rules follow LiveCodeBench's `lcb_runner/evaluation/testing_util.py` (commit 28fef95e):
- stdin problems: the code, `if __name__ == '__main__':` unwrapped and everything but its imports moved into a
  function (so a `global` statement no longer reaches top-level names, as there), runs after LCB's import header;
  its output and the gold are stripped, split into lines (counts must match) and compared line by line: equal
  strings, or else every whitespace token parses as a Decimal and the Decimal lists are equal (exact: "0.50" ==
  "0.5", "0.3333333" != "0.33333333").
- functional (LeetCode) problems: `Solution().<func_name>(*args)` with one JSON value per input line; a returned
  tuple becomes a list, then `==` against the JSON gold.
Differences from LCB: stdin and stdout are real files per test, so `open(0)`, `sys.stdin.buffer`, `from sys import
stdin` and `os.write(1, ...)` work as on a judge (LCB mocks them); the module is re-executed per stdin test; a
functional result must be made of plain Python types (LCB would pass an object whose `__eq__` says yes); tests after
a wrong answer still run (`passed` counts them), the first timeout ends the run, and a program that swallows the
timeout is stopped 1 s later. All tests of a problem run in one sandboxed process (the trusted harness `_HARNESS`,
with a per-test timer); its verdicts come back on a descriptor the program is not pointed at, which stops stray
prints, not code written to forge them (as in LCB, the program shares the harness's interpreter).
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from driftscope.eval.sandbox import run_python

TESTTYPES = ("stdin", "functional")
VERDICTS = ("pass", "wrong_answer", "runtime_error", "timeout", "memory")
_PICKLE_PROTO = b"\x80"  # first byte of every pickle of protocol 2 or later
_FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
_PYTHON_TAGS = ("python", "python3", "py")


@dataclass(frozen=True)
class TestCase:
    input: str
    output: str
    testtype: str  # "stdin" | "functional"

    __test__ = False  # not a pytest class


def extract_code(response: str) -> str | None:
    """The program in `response`: after the last `</think>`, the last ```python fenced block, else the last fenced
    block of any language; None when there is no closed block (LCB: the text between the last two fence lines)."""
    text = response.rsplit("</think>", 1)[-1]
    blocks: list[tuple[str, list[str]]] = []
    open_tag, body = None, []
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if m is None:
            if open_tag is not None:
                body.append(line)
        elif open_tag is None:
            open_tag, body = m.group(1).lower(), []
        else:
            blocks.append((open_tag, body))
            open_tag = None
    if not blocks:
        return None
    python = [b for tag, b in blocks if tag in _PYTHON_TAGS]
    return "\n".join(python[-1] if python else blocks[-1][1])


def _tests_from_json(value: object, field: str, qid: str) -> list[TestCase]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field} of {qid}: not JSON ({e})") from None
    if not isinstance(value, list):
        raise ValueError(f"{field} of {qid}: expected a list of tests, got {type(value).__name__}")
    tests = []
    for k, t in enumerate(value):
        if not isinstance(t, dict) or not all(isinstance(t.get(key), str) for key in ("input", "output")):
            raise ValueError(f"{field}[{k}] of {qid}: expected {{input: str, output: str, testtype}}, got {t!r:.80}")
        if t.get("testtype") not in TESTTYPES:
            raise ValueError(f"{field}[{k}] of {qid}: testtype {t.get('testtype')!r}, expected one of {TESTTYPES}")
        tests.append(TestCase(t["input"], t["output"], t["testtype"]))
    return tests


_UNPICKLE = """\
import pickle, sys
value = pickle.loads(sys.stdin.buffer.read())
if not isinstance(value, str):
    raise SystemExit(f"the pickle holds a {type(value).__name__}, expected the str of a JSON list")
sys.stdout.write(value)
"""


def decode_private_tests(value: str, qid: str = "?", *, timeout_s: float = 60.0) -> list[TestCase]:
    """HF `private_test_cases`: JSON, or base64(zlib(JSON)), or base64(zlib(pickle(JSON str))) as LCB ships it.
    A pickle is never loaded here: it is unpickled inside the sandbox, which must hand back a str of JSON."""
    try:
        return _tests_from_json(json.loads(value), "private_test_cases", qid)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(value.encode("ascii"), validate=True))
    except (binascii.Error, zlib.error, UnicodeEncodeError) as e:
        raise ValueError(f"private_test_cases of {qid}: neither JSON nor base64+zlib ({e})") from None
    if not raw.startswith(_PICKLE_PROTO):
        return _tests_from_json(raw.decode("utf-8"), "private_test_cases", qid)
    res = run_python(_UNPICKLE, raw, timeout_s=timeout_s, memory_bytes=4 << 30, stdout_bytes=1 << 30)
    if res.status != "ok" or res.stdout_truncated:
        why = "decodes to more than 1 GiB" if res.stdout_truncated else res.stderr.strip()[-200:]
        raise ValueError(f"private_test_cases of {qid}: the sandboxed unpickle ended {res.status}: {why}")
    return _tests_from_json(res.stdout, "private_test_cases", qid)


def load_tests(doc: dict) -> list[TestCase]:
    """Public tests, then private ones if the doc carries them (HF rows do; the shared sample has public only)."""
    qid = str(doc.get("question_id", "?"))
    if "public_test_cases" not in doc:
        raise ValueError(f"doc {qid} has no public_test_cases field")
    tests = _tests_from_json(doc["public_test_cases"], "public_test_cases", qid)
    private = doc.get("private_test_cases")
    if private:
        tests += decode_private_tests(private, qid) if isinstance(private, str) else _tests_from_json(
            private, "private_test_cases", qid)
    if not tests:
        raise ValueError(f"doc {qid} has no tests")
    return tests


def _func_name(doc: dict, tests: list[TestCase]) -> str | None:
    qid = str(doc.get("question_id", "?"))
    meta = doc.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"metadata of {qid}: not JSON ({e})") from None
    name = meta.get("func_name")
    kinds = {t.testtype for t in tests}
    want = "functional" if name else "stdin"
    if kinds != {want}:
        raise ValueError(f"doc {qid}: tests are {sorted(kinds)} but metadata.func_name={name!r} means {want!r}")
    if name:
        for k, t in enumerate(tests):
            try:
                [json.loads(line) for line in t.input.split("\n")]
                json.loads(t.output)
            except json.JSONDecodeError as e:
                raise ValueError(f"test {k} of {qid}: functional input/output is not JSON per line ({e})") from None
    return name


def grade(response: str, doc: dict, *, timeout_s: float = 6.0, memory_bytes: int = 2 << 30,
          isolation: str | None = None) -> dict:
    """Score one response on one LiveCodeBench row: {"pass": 0/1, "passed", "total", "status", "error", ...};
    status is "passed", a verdict of VERDICTS for the first failing test, "compile_error", "no_code" or "killed".
    `timeout_s` is LCB's per-test limit; the whole run gets LCB's (timeout_s + 1) * tests + 5."""
    tests = load_tests(doc)
    fn_name = _func_name(doc, tests)
    out = {"pass": 0, "passed": 0, "total": len(tests), "status": "no_code", "error": None}
    code = extract_code(response)
    if code is None:
        return out | {"error": "no closed ``` code block in the response"}
    payload = {"code": code, "fn_name": fn_name, "timeout_s": timeout_s,
               "tests": [{"input": t.input, "output": t.output} for t in tests]}
    res = run_python(_HARNESS, json.dumps(payload), timeout_s=(timeout_s + 1) * len(tests) + 5,
                     memory_bytes=memory_bytes, stdout_bytes=1 << 20, isolation=isolation)
    verdicts: dict[int, dict] = {}
    compile_error = None
    for line in res.stdout.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "compile_error" in rec:
            compile_error = str(rec["compile_error"])
        elif isinstance(rec, dict) and isinstance(rec.get("i"), int) and rec.get("verdict") in VERDICTS:
            verdicts.setdefault(rec["i"], rec)
    passed = sum(1 for k in range(len(tests)) if verdicts.get(k, {}).get("verdict") == "pass")
    out |= {"passed": passed, "isolation": res.isolation, "wall_s": round(res.wall_s, 3)}
    if compile_error is not None:
        return out | {"status": "compile_error", "error": compile_error[:500]}
    for k in range(len(tests)):
        rec = verdicts.get(k)
        if rec is None:  # the harness died or was killed before reporting test k
            status = {"timeout": "timeout", "memory": "memory", "killed": "killed"}.get(res.status, "runtime_error")
            return out | {"status": status, "error": f"test {k}: no verdict (sandbox {res.status}, rc "
                                                     f"{res.returncode}): {res.stderr.strip()[-300:]}"}
        if rec["verdict"] != "pass":
            return out | {"status": rec["verdict"], "error": f"test {k}: {str(rec.get('msg', ''))[:500]}"}
    return out | {"pass": 1, "status": "passed"}


def grade_many(items: Iterable[tuple[str, dict]], *, workers: int | None = None, **kwargs) -> list[dict]:
    """grade() over (response, doc) pairs, in order; `workers` threads each wait on one sandboxed process."""
    items = list(items)
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers={workers}: expected >= 1")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: grade(item[0], item[1], **kwargs), items))


# The trusted harness: run inside the sandbox as main.py; reads {code, fn_name, timeout_s, tests} as JSON on stdin,
# writes one JSON verdict per test to a private dup of stdout. LCB's import header, clean_if_name and make_function
# are reproduced from testing_util.py.
_HARNESS = r'''
import ast, json, os, signal, sys, types
from decimal import Decimal

IMPORTS = ("from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
           "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\n"
           "from statistics import *\nfrom itertools import *\nfrom functools import *\nfrom operator import *\n"
           "from io import *\nfrom sys import *\nfrom json import *\nfrom builtins import *\nfrom typing import *\n"
           "import string\nimport re\nimport datetime\nimport collections\nimport heapq\nimport bisect\n"
           "import copy\nimport math\nimport random\nimport statistics\nimport itertools\nimport functools\n"
           "import operator\nimport io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n")
PLAIN = (type(None), bool, int, float, str)


class Timeout(BaseException):  # not an Exception: `except Exception` in the program does not swallow it
    pass


TIMER = {"armed": False, "fires": 0, "give_up": None}  # give_up(): report a timeout and exit, no questions asked


def on_alarm(signum, frame):
    if not TIMER["armed"]:
        return
    TIMER["fires"] += 1
    if TIMER["fires"] > 2:  # the program swallowed Timeout twice (a bare except): stop it from here
        TIMER["give_up"]()
    raise Timeout


def timed(fn, timeout):
    TIMER["armed"], TIMER["fires"] = True, 0
    signal.setitimer(signal.ITIMER_REAL, timeout, 0.5)  # re-fires if a bare except swallows it
    try:
        return fn()
    finally:
        TIMER["armed"] = False  # from here on a late alarm is ignored
        signal.setitimer(signal.ITIMER_REAL, 0)


def clean_if_name(code):
    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        if isinstance(last, ast.If) and ast.unparse(last.test).strip() == "__name__ == '__main__'":
            code = ast.unparse(tree.body[:-1]) + "\n" + ast.unparse(last.body)
    except Exception:
        pass
    return code


def make_function(code):
    try:
        tree = ast.parse(code)
        imports = [s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))]
        rest = [s for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom))] or [ast.Pass()]
        extra = {"type_params": []} if "type_params" in ast.FunctionDef._fields else {}
        fn = ast.FunctionDef(name="wrapped_function", args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                             kw_defaults=[], defaults=[]), body=rest, decorator_list=[], lineno=-1, **extra)
        return IMPORTS + "\n" + ast.unparse(imports) + "\n" + ast.unparse(fn)
    except Exception:
        return code


def lines(text):
    return [line.strip() for line in text.strip().split("\n")]


def stdio_verdict(pred, gold):
    p, g = lines(pred), lines(gold)
    if len(p) != len(g):
        return "wrong_answer", f"{len(p)} output lines, expected {len(g)}"
    for k, (a, b) in enumerate(zip(p, g)):
        if a == b:
            continue
        try:
            if [Decimal(x) for x in a.split()] == [Decimal(x) for x in b.split()]:
                continue
        except Exception:
            pass
        return "wrong_answer", f"line {k}: {a[:100]!r} != {b[:100]!r}"
    return "pass", ""


def plain(x):
    if type(x) in PLAIN:
        return True
    if type(x) in (list, tuple):
        return all(plain(v) for v in x)
    if type(x) is dict:
        return all(plain(k) and plain(v) for k, v in x.items())
    return False


def point(fd, path, flags):  # the program may have closed fd (`open(0).read()` does), so os.open may return it
    new = os.open(path, flags, 0o600)
    if new != fd:
        os.dup2(new, fd)
        os.close(new)
    else:
        os.set_inheritable(fd, True)


def fresh_std(in_path, out_path):
    point(0, in_path, os.O_RDONLY)
    point(1, out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdin = sys.__stdin__ = open(0, "r", encoding="utf-8", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)


def flush_std():
    for f in {id(sys.stdout): sys.stdout, id(sys.__stdout__): sys.__stdout__}.values():
        try:
            f.flush()
        except Exception:
            pass


def failure(e):
    if isinstance(e, Timeout):
        return "timeout", "time limit exceeded"
    if isinstance(e, MemoryError):
        return "memory", "MemoryError"
    return "runtime_error", repr(e)[:300]


def stdio_test(code, test, paths, timeout):
    mod = types.ModuleType("tmp_sol")

    def run():
        exec(code, mod.__dict__)
        mod.wrapped_function()

    try:
        timed(run, timeout)
    except SystemExit:  # exit() after printing is fine, as in LCB
        pass
    except BaseException as e:
        return failure(e)
    finally:
        flush_std()
    with open(paths[1], "rb") as f:
        return stdio_verdict(f.read().decode("utf-8", "replace"), test["output"])


def functional_test(method, test, timeout):
    args = [json.loads(line) for line in test["input"].split("\n")]
    gold = json.loads(test["output"])
    try:
        pred = timed(lambda: method(*args), timeout)
    except BaseException as e:
        return failure(e)
    finally:
        flush_std()
    pred = list(pred) if isinstance(pred, tuple) else pred
    if plain(pred) and pred == gold:
        return "pass", ""
    return "wrong_answer", f"returned {repr(pred)[:200]}, expected {repr(gold)[:200]}"


def compile_job(job, paths, timeout):
    """(code object, None) for stdin problems; (None, bound method) for functional ones. Raises on failure."""
    if job["fn_name"] is None:
        return compile(make_function(clean_if_name(job["code"])), "<solution>", "exec"), None
    fresh_std(*paths)
    mod = types.ModuleType("tmp_sol")
    source = IMPORTS + "\n\n" + job["code"]
    timed(lambda: exec(compile(source, "<solution>", "exec"), mod.__dict__), timeout)
    sol = mod.Solution() if "class Solution" in job["code"] else mod
    method = getattr(sol, job["fn_name"], None)
    if method is None:
        raise AttributeError(f"the code defines no {job['fn_name']}")
    return None, method


def main():
    job = json.loads(sys.stdin.buffer.read())
    results = os.dup(1)  # verdicts go here; the program's fd 1 is a file per test

    def emit(**rec):
        os.write(results, (json.dumps(rec) + "\n").encode())

    paths = (os.path.abspath("stdin.txt"), os.path.abspath("stdout.txt"))
    signal.signal(signal.SIGALRM, on_alarm)
    sys.set_int_max_str_digits(50000)
    timeout = job["timeout_s"]
    open(paths[0], "w").close()
    TIMER["give_up"] = lambda: (emit(compile_error="time limit exceeded while defining the code"), os._exit(0))
    try:
        code, method = compile_job(job, paths, timeout)
    except BaseException as e:
        return emit(compile_error=repr(e)[:500])
    for i, test in enumerate(job["tests"]):
        def give_up(i=i):
            emit(i=i, verdict="timeout", msg="time limit exceeded; the program caught the timeout and went on")
            emit(done=True)
            os._exit(0)

        TIMER["give_up"] = give_up
        with open(paths[0], "w", encoding="utf-8") as f:
            f.write(test["input"] if code is not None else "")
        fresh_std(*paths)
        verdict, msg = stdio_test(code, test, paths, timeout) if code is not None else functional_test(
            method, test, timeout)
        emit(i=i, verdict=verdict, msg=msg)
        if verdict == "timeout":
            break
    emit(done=True)


main()
'''
