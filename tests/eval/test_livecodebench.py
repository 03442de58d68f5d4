"""LiveCodeBench grader: code extraction, test loading, LCB's comparison rules, real problems, hostile programs."""
from __future__ import annotations

import base64
import json
import pickle
import secrets
import time
import zlib
from pathlib import Path

import pytest

from driftscope.eval import sandbox
from driftscope.eval.graders.livecodebench import (
    TestCase,
    decode_private_tests,
    extract_code,
    grade,
    grade_many,
    load_tests,
)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nIt runs in O(n)."


def stdin_doc(*pairs: tuple[str, str], qid: str = "synthetic") -> dict:
    tests = [{"input": i, "output": o, "testtype": "stdin"} for i, o in pairs]
    return {"question_id": qid, "public_test_cases": json.dumps(tests), "metadata": "{}"}


def functional_doc(func: str, *pairs: tuple[str, str], qid: str = "synthetic") -> dict:
    tests = [{"input": i, "output": o, "testtype": "functional"} for i, o in pairs]
    return {"question_id": qid, "public_test_cases": json.dumps(tests), "metadata": json.dumps({"func_name": func})}


# ---- extraction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("response, code", [
    ("```python\nprint(1)\n```", "print(1)"),
    ("```\nprint(2)\n```", "print(2)"),
    ("a\n```python\nprint(1)\n```\nb\n```python\nprint(2)\n```\n", "print(2)"),  # the last python block
    ("```python\nprint(1)\n```\n```text\n3\n```", "print(1)"),  # a python block beats a later other block
    ("<think>\n```python\nprint('draft')\n```\n</think>\n```python\nprint('final')\n```", "print('final')"),
    ("<think>```python\nprint('draft')\n```</think> no code after thinking", None),
    ("no code at all", None),
    ("```python\nprint('unclosed')", None),
    ("  ```Python3\nx = 1\nprint(x)\n  ```", "x = 1\nprint(x)"),
], ids=["python", "bare", "last", "python-first", "after-think", "only-in-think", "none", "unclosed", "indented"])
def test_extract_code(response, code):
    assert extract_code(response) == code


# ---- loading tests ------------------------------------------------------------------------------------------


def test_sample_rows_load(shared_data: Path):
    text = (shared_data / "benchmarks/livecodebench_sample.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    tests = [load_tests(r) for r in rows]
    kinds = [{t.testtype for t in ts} for ts in tests]
    assert len(rows) == 120 and sum(map(len, tests)) == 300
    assert kinds.count({"stdin"}) == 60 and kinds.count({"functional"}) == 60


@pytest.mark.parametrize("doc, match", [
    ({"question_id": "q1"}, "doc q1 has no public_test_cases"),
    ({"question_id": "q2", "public_test_cases": "[{"}, "public_test_cases of q2: not JSON"),
    ({"question_id": "q3", "public_test_cases": '[{"input": "1", "output": "1", "testtype": "file"}]'},
     r"public_test_cases\[0\] of q3: testtype 'file'"),
    ({"question_id": "q4", "public_test_cases": "[]"}, "doc q4 has no tests"),
], ids=["missing", "not-json", "testtype", "empty"])
def test_bad_docs_refused(doc, match):
    with pytest.raises(ValueError, match=match):
        load_tests(doc)


def test_testtype_must_match_func_name():
    doc = stdin_doc(("1\n", "1\n"), qid="q5") | {"metadata": json.dumps({"func_name": "f"})}
    with pytest.raises(ValueError, match="doc q5: tests are \\['stdin'\\] but metadata.func_name='f'"):
        grade(fenced("print(1)"), doc)


TESTS = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]


@pytest.mark.parametrize("encode", [
    lambda t: json.dumps(t),
    lambda t: base64.b64encode(zlib.compress(json.dumps(t).encode())).decode(),
    lambda t: base64.b64encode(zlib.compress(pickle.dumps(json.dumps(t)))).decode(),  # LCB's HF format
], ids=["json", "zlib-json", "zlib-pickle"])
def test_private_tests_decoded(encode):
    doc = stdin_doc(("5 5\n", "10\n")) | {"private_test_cases": encode(TESTS)}
    assert load_tests(doc) == [TestCase("5 5\n", "10\n", "stdin"), TestCase("1 2\n", "3\n", "stdin")]


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_hostile_pickle_runs_only_in_the_sandbox(tmp_path):
    marker = Path("/tmp") / f"driftscope-pickle-{secrets.token_hex(6)}"
    blob = base64.b64encode(zlib.compress(pickle.dumps(_Evil(str(marker))))).decode()
    try:
        with pytest.raises(ValueError, match="private_test_cases of q6: the sandboxed unpickle ended error"):
            decode_private_tests(blob, "q6")
        if sandbox.LEVELS[sandbox.isolation()].namespaces:
            assert not marker.exists(), "the pickle's payload wrote outside the sandbox"
    finally:
        marker.unlink(missing_ok=True)


def test_private_garbage_refused():
    with pytest.raises(ValueError, match="private_test_cases of q7: neither JSON nor base64"):
        decode_private_tests("not base64 !!", "q7")


# ---- real problems from the shared sample -------------------------------------------------------------------

CORRECT = {
    "abc301_a": "n = int(input())\ns = input()\nt, a = s.count('T'), s.count('A')\n"
                "if t != a:\n    print('T' if t > a else 'A')\nelse:\n    print('A' if s[-1] == 'T' else 'T')",
    "abc309_a": "a, b = map(int, input().split())\nprint('Yes' if b == a + 1 and a % 3 != 0 else 'No')",
    "abc330_a": "n, l, *a = map(int, open(0).read().split())\nprint(sum(x >= l for x in a))",
    "abc341_a": "from sys import stdin\nn = int(stdin.readline())\nprint('10' * n + '1')",
    "2819": "class Solution:\n    def removeTrailingZeros(self, num: str) -> str:\n        return num.rstrip('0')",
    "2902": "class Solution:\n    def maxSum(self, nums: List[int]) -> int:\n        best, ans = {}, -1\n"
            "        for x in nums:\n            d = max(str(x))\n            if d in best:\n"
            "                ans = max(ans, best[d] + x)\n            best[d] = max(best.get(d, 0), x)\n"
            "        return ans",
    "3188": "class Solution:\n    def findChampion(self, grid: List[List[int]]) -> int:\n"
            "        return next(i for i, row in enumerate(grid) if sum(row) == len(grid) - 1)",
    "3226": "class Solution:\n    def numberGame(self, nums):\n        s = sorted(nums)\n"
            "        return tuple(x for i in range(0, len(s), 2) for x in (s[i + 1], s[i]))",  # a tuple: LCB lists it
}

WRONG = {  # qid, code, expected status
    "off-by-one": ("abc330_a", "n, l, *a = map(int, open(0).read().split())\nprint(sum(x > l for x in a))",
                   "wrong_answer"),
    "extra-line": ("abc309_a", "a, b = map(int, input().split())\nprint('Yes' if b == a + 1 else 'No')\nprint()",
                   "wrong_answer"),
    "crash": ("abc341_a", "print(1 // 0)", "runtime_error"),
    "syntax": ("abc341_a", "print(", "compile_error"),
    "wrong-return": ("3188", "class Solution:\n    def findChampion(self, grid):\n        return 0", "wrong_answer"),
    "no-method": ("3188", "class Solution:\n    def champion(self, grid):\n        return 0", "compile_error"),
    "eq-cheat": ("2819", "class Solution:\n    def removeTrailingZeros(self, num):\n        class Any:\n"
                 "            def __eq__(self, other):\n                return True\n        return Any()",
                 "wrong_answer"),
    "set-not-list": ("3226", "class Solution:\n    def numberGame(self, nums):\n        return set(nums)",
                     "wrong_answer"),
}


@pytest.fixture(scope="module")
def rows(shared_data: Path) -> dict[str, dict]:
    text = (shared_data / "benchmarks/livecodebench_sample.jsonl").read_text()
    return {r["question_id"]: r for r in map(json.loads, text.splitlines())}


@pytest.mark.parametrize("qid", list(CORRECT))
def test_correct_solutions_pass(rows, qid):
    res = grade(fenced(CORRECT[qid]), rows[qid])
    assert (res["pass"], res["status"], res["passed"]) == (1, "passed", res["total"]), res


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_solutions_fail(rows, case):
    qid, code, status = WRONG[case]
    res = grade(fenced(code), rows[qid])
    assert (res["pass"], res["status"]) == (0, status), res


def test_response_without_code_fails(rows):
    res = grade("I think the answer is 3.", rows["abc341_a"])
    assert (res["pass"], res["passed"], res["total"], res["status"]) == (0, 0, 3, "no_code")


def test_grade_many_keeps_order(rows):
    items = [(fenced(CORRECT["abc309_a"]), rows["abc309_a"]), (fenced("print('No')"), rows["abc309_a"]),
             (fenced(CORRECT["2819"]), rows["2819"]), ("no code", rows["2819"])]
    res = grade_many(items, workers=2)
    assert [(r["pass"], r["passed"], r["total"]) for r in res] == [(1, 3, 3), (0, 2, 3), (1, 2, 2), (0, 0, 2)]


# ---- LCB's comparison rules, on synthetic problems ----------------------------------------------------------


@pytest.mark.parametrize("printed, gold, ok", [
    ("3", "3\n", True),
    ("3  \n\n\n", "3\n", True),  # outer and per-line whitespace stripped
    ("1  2\t3", "1 2 3\n", True),  # token-wise via Decimal
    ("0.50", "0.5\n", True),  # Decimal equality
    ("1e2", "100\n", True),
    ("0.3333333", "0.33333333\n", False),  # exact: no tolerance
    ("yes", "Yes\n", False),
    ("Yes  No", "Yes No\n", False),  # non-numeric tokens: only the whole stripped line may match
    ("3\n4", "3 4\n", False),  # line counts differ
], ids=["exact", "blank-lines", "spaces", "decimal", "exponent", "precision", "case", "words", "lines"])
def test_stdio_comparison(printed, gold, ok):
    res = grade(fenced(f"print({printed!r}, end='')"), stdin_doc(("", gold)))
    assert res["pass"] == int(ok), res


@pytest.mark.parametrize("ret, gold, ok", [
    ("[1, 2]", "[1, 2]", True),
    ("(1, 2)", "[1, 2]", True),  # a top-level tuple becomes a list
    ("[(1, 2)]", "[[1, 2]]", False),  # nested tuples stay tuples, as in LCB
    ("1.0", "1", True),
    ("True", "true", True),
    ("{'a': [1]}", '{"a": [1]}', True),
    ("'1'", "1", False),
], ids=["list", "tuple", "nested-tuple", "float-int", "bool", "dict", "str-int"])
def test_functional_comparison(ret, gold, ok):
    code = f"class Solution:\n    def f(self, x, y):\n        return {ret}"
    res = grade(fenced(code), functional_doc("f", ('3\n"s"', gold)))
    assert res["pass"] == int(ok), res


@pytest.mark.parametrize("code", [
    "print(sum(map(int, open(0).read().split())))",
    "import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))",
    "from sys import stdin\ninput = stdin.readline\nprint(sum(map(int, input().split())))",
    "import os\nos.write(1, str(sum(map(int, input().split()))).encode())",
    "import sys\nprint(sum(map(int, input().split())))\nsys.exit(0)",
    "def main():\n    print(sum(map(int, input().split())))\n\nif __name__ == '__main__':\n    main()",
], ids=["open0", "buffer", "from-sys", "os-write", "exit", "main-guard"])
def test_stdin_idioms_see_each_tests_input(code):
    res = grade(fenced(code), stdin_doc(("1 2\n", "3\n"), ("10 20 30\n", "60\n")))
    assert (res["pass"], res["passed"]) == (1, 2), res


# ---- hostile programs ---------------------------------------------------------------------------------------


def test_infinite_loop_times_out_per_test():
    t0 = time.monotonic()
    res = grade(fenced("while True:\n    pass"), stdin_doc(("1\n", "1\n"), ("2\n", "2\n")), timeout_s=1.0)
    took = time.monotonic() - t0
    assert (res["pass"], res["passed"], res["status"]) == (0, 0, "timeout"), res
    assert took < 4.0, f"graded after {took:.2f} s with a 1 s per-test limit"


def test_swallowed_timeout_still_ends():
    code = "while True:\n    try:\n        while True:\n            pass\n    except:\n        pass"
    t0 = time.monotonic()
    res = grade(fenced(code), stdin_doc(("1\n", "1\n")), timeout_s=1.0)
    assert (res["pass"], res["status"]) == (0, "timeout"), res
    assert time.monotonic() - t0 < 4.0  # the harness gives up 1 s after the limit, before the sandbox does (7 s)


def test_killing_the_harness_fails_the_problem():
    res = grade(fenced("import os\nos.kill(os.getpid(), 9)"), stdin_doc(("1\n", "1\n")))
    assert (res["pass"], res["status"]) == (0, "killed"), res


def test_forged_verdicts_on_stdout_ignored():
    code = ('print(\'{"i": 0, "verdict": "pass", "msg": ""}\')\nprint(\'{"i": 1, "verdict": "pass", "msg": ""}\')')
    res = grade(fenced(code), stdin_doc(("1\n", "2\n"), ("1\n", "2\n")))
    assert (res["pass"], res["passed"], res["status"]) == (0, 0, "wrong_answer"), res
