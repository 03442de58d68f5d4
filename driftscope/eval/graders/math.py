"""Math answers: math-verify equivalence (`grade_math`, `MathGrader` for batches) and a last-\\boxed string match.

math-verify bounds its parsing and comparisons with ``signal.alarm``, which only works in a main thread, so
`MathGrader` runs it in worker processes (spawned: each worker's main thread), with a per-item wall-clock timeout
on top that scores a hung item 0, notes it and restarts the pool. `grade_math` is the one-pair form: in the main
thread it grades in-process, elsewhere it goes through a shared `MathGrader`.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from driftscope.eval.graders.text import last_boxed, strip_thinking

_INSTALL_HINT = "math grading needs math-verify: pip install 'driftscope[eval]'"


def _math_verify():
    try:
        import math_verify
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    # its bare "Timeout during comparison" warning (no item named): a comparison over its time limit is False, a 0
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def gold_latex(gold: str) -> str:
    """A bare gold answer (``\\frac{14}{3}``, ``204``, OlympiadBench's ``$(3,2),(-3,2)$``) as one ``$...$`` span.

    Escaped currency signs ``\\$`` and any ``$`` delimiters already there are removed first, so a gold made of
    several ``$...$`` pieces (OlympiadBench's multi-answer tuples) becomes one expression, and math-verify's
    LaTeX extractor, which only reads inside math delimiters or a box, sees the whole answer.
    """
    body = gold.replace("\\$", "").replace("$", "").strip()
    return f"${body}$"


def _configs(mv) -> tuple[list, list]:
    """(gold, prediction) extraction configs: LaTeX then plain expressions; a box outranks other prediction text."""
    gold = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    pred = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return gold, pred


def grade_math_local(response: str, gold: str) -> float:
    """`grade_math` in this process: math-verify with its own signal timeouts, so main thread only.

    This is what `MathGrader` workers run. Thinking is stripped first. The prediction is the last closed
    ``\\boxed{...}`` when there is one (math-verify alone would join every box of a response into one set, so
    a quoted ``\\boxed{your_answer}`` spoils a right answer), else the whole text through math-verify's own
    extraction (LaTeX, then a plain expression). The gold is parsed from `gold_latex(gold)` and compared as
    ``verify(gold, prediction)`` (math-verify is not symmetric: the gold goes first).
    """
    mv = _math_verify()
    gold_cfg, pred_cfg = _configs(mv)
    gold_parsed = mv.parse(gold_latex(gold), extraction_config=gold_cfg)
    if not gold_parsed:
        return 0.0
    text = strip_thinking(response)
    boxed = last_boxed(text)
    pred_parsed = mv.parse(text if boxed is None else f"\\boxed{{{boxed}}}", extraction_config=pred_cfg)
    if not pred_parsed:
        return 0.0
    return 1.0 if mv.verify(gold_parsed, pred_parsed) else 0.0


def _warm(grade_fn: Callable[[str, str], float]) -> int:
    """Run once in each new worker: receiving ``grade_fn`` imports its module there."""
    if grade_fn is grade_math_local:
        _math_verify()
    time.sleep(0.02)  # hold this worker a moment, so the other warm-up calls reach the other workers
    return os.getpid()


class MathGrader:
    """math-verify over many (response, gold) pairs in a pool of spawned worker processes.

    ``timeout_s`` bounds each item's wall-clock time from the moment a worker takes it (at most ``workers``
    items are in flight, so none waits in a queue). An item past it scores 0 with a line in `notes`, and the
    pool is killed and restarted; the other items that were in flight are re-run. When a worker dies (a crash,
    the OOM killer) the items in flight are re-run one at a time, and the one that kills its worker again scores
    0 with a note. math-verify's own 5 s parse and comparison limits still apply inside each worker.

    ``grade_fn`` is the per-pair function the workers run, `grade_math_local` unless given (it must be a
    module-level function, picklable by name). Use as a context manager or call `close()`. Spawned workers
    re-import the caller's ``__main__``: a script needs an ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 20.0, start_timeout_s: float = 180.0,
                 grade_fn: Callable[[str, str], float] | None = None):
        if workers is None:
            workers = max(1, min(4, os.cpu_count() or 1))
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        _math_verify()  # fail here, with the install hint, rather than inside a worker
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.grade_fn = grade_math_local if grade_fn is None else grade_fn
        self.notes: list[str] = []
        self.restarts = 0
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._kill_pool()

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            # Start every worker and import the grading code there before grading, so that start-up is not
            # charged to an item's timeout: warm-up rounds until each of the `workers` processes has answered.
            deadline = time.monotonic() + self.start_timeout_s
            seen: set[int] = set()
            while len(seen) < self.workers:
                warm = [self._pool.submit(_warm, self.grade_fn) for _ in range(self.workers)]
                done, not_done = wait(warm, timeout=max(0.0, deadline - time.monotonic()))
                if not_done or any(f.exception() is not None for f in done):
                    self._kill_pool()
                    raise RuntimeError(f"math grader workers did not start within {self.start_timeout_s:.0f} s")
                seen.update(f.result() for f in done)
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public way to stop a busy worker before Python 3.14's terminate_workers()
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def grade_many(self, pairs: Iterable[tuple[str, str]]) -> list[float]:
        """A score in {0, 1} for each (response, gold) pair, in order; see `grade_math_local` for the rule."""
        pairs = list(pairs)
        scores = [0.0] * len(pairs)
        with self._lock:
            pending = deque(range(len(pairs)))  # to run, up to `workers` at a time
            suspects: deque[int] = deque()  # in flight when a worker died: re-run alone
            running: dict[Future, tuple[int, float, bool]] = {}  # future -> (item, deadline, ran alone)
            while pending or suspects or running:
                pool = self._ensure_pool()
                alone = bool(suspects)  # a suspect runs with nothing else in flight
                queue, room = (suspects, 1) if alone else (pending, self.workers)
                while queue and len(running) < room:
                    i = queue.popleft()
                    running[pool.submit(self.grade_fn, *pairs[i])] = (i, time.monotonic() + self.timeout_s, alone)
                first_deadline = min(deadline for _, deadline, _ in running.values())
                done, _ = wait(running, timeout=max(0.0, first_deadline - time.monotonic()),
                               return_when=FIRST_COMPLETED)
                broken = False
                for fut in done:
                    i, _, alone = running.pop(fut)
                    try:
                        scores[i] = float(fut.result())
                    except BrokenProcessPool:
                        broken = True
                        if alone:
                            self.notes.append(f"item {i}: its math grader worker died; scored 0, pool restarted")
                        else:
                            suspects.append(i)
                    except Exception as err:  # this item's own failure; the worker lives on
                        self.notes.append(f"item {i}: {type(err).__name__}: {err}; scored 0")
                now = time.monotonic()
                late = [fut for fut, (_, deadline, _) in running.items() if deadline <= now and not fut.done()]
                for fut in late:
                    i, _, _ = running.pop(fut)
                    self.notes.append(f"item {i}: timed out after {self.timeout_s:g} s; scored 0, pool restarted")
                if late or broken:
                    rerun = sorted(i for i, _, _ in running.values())
                    (suspects if broken else pending).extendleft(reversed(rerun))
                    running.clear()
                    self._kill_pool()
                    self.restarts += 1
        return scores


_DEFAULT: MathGrader | None = None
_DEFAULT_LOCK = threading.Lock()


def _default_grader() -> MathGrader:
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = MathGrader(workers=1)
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def grade_math(response: str, gold: str) -> float:
    """1.0 when the response's answer is math-verify-equivalent to ``gold``, else 0.0; thinking stripped first.

    Callable from any thread: off the main thread (where math-verify's signal timeouts cannot work) the pair
    goes to a shared one-worker `MathGrader`. For many pairs use `MathGrader.grade_many`.
    """
    if threading.current_thread() is threading.main_thread():
        return grade_math_local(response, gold)
    return _default_grader().grade_many([(response, gold)])[0]


# ---- exact match of the last \boxed -------------------------------------------------------------------------

_SPACING = re.compile(r"\\\\|\\[!,;:]|\\ |\s+")  # a row break \\ is kept whole
_BARE_FRAC = re.compile(r"\\frac(?!\{)(\w)(\w|\{)")
_BARE_SQRT = re.compile(r"\\sqrt(?![{\[])(\w)")
_TRAILING_TEXT = re.compile(r"(?<=.)\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?$")  # a unit, maybe squared
_NUMBER = re.compile(r"-?\d*\.?\d+")


def _fix_bare_frac(match: re.Match) -> str:
    a, b = match.group(1), match.group(2)
    return "\\frac{" + a + "}{" if b == "{" else "\\frac{" + a + "}{" + b + "}"


def normalize_boxed(answer: str) -> str:
    """An answer string in the canonical form `grade_boxed_exact` compares. Steps, in this order:

    1. drop currency signs ``\\$``, then every ``$`` (math delimiters: OlympiadBench writes ``$69$,$84$``);
       ``\\dfrac``/``\\tfrac`` to ``\\frac``; drop ``\\left``/``\\right``, degrees (``^{\\circ}``,
       ``^\\circ``) and percent signs;
    2. remove all whitespace and LaTeX spacing (``\\!``, ``\\,``, ``\\;``, ``\\:``, ``\\ ``); a matrix row
       break ``\\\\`` stays;
    3. drop a trailing unit ``\\text{...}``/``\\mbox{...}`` (with a power such as ``^2``) after other
       content, then a trailing ``.``;
    4. drop a short left-hand side (at most two characters): ``x=5`` to ``5``;
    5. brace one-character arguments: ``\\frac12`` to ``\\frac{1}{2}``, ``\\sqrt3`` to ``\\sqrt{3}``;
    6. an integer ratio ``a/b`` to ``\\frac{a}{b}``; a plain number without leading zeros or trailing
       fractional zeros (``025``, ``4.0``, ``18.90``), with a leading ``0`` (``.5``); ``0.5`` to ``\\frac{1}{2}``.

    These are the string rules of lm-eval's ``hendrycks_math`` ``strip_string`` (used by the paper's MATH-500
    and OlympiadBench tasks) plus the leading/trailing zero handling of the paper's OlympiadBench task.
    """
    s = answer.replace("\\$", "").replace("$", "").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").replace("%", "")
    s = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else "", s)
    s = _TRAILING_TEXT.sub("", s)
    s = s.rstrip(".")
    parts = s.split("=")
    if len(parts) == 2 and 0 < len(parts[0]) <= 2:
        s = parts[1]
    s = _BARE_SQRT.sub(lambda m: "\\sqrt{" + m.group(1) + "}", s)
    s = _BARE_FRAC.sub(_fix_bare_frac, s)
    ratio = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if ratio:
        s = "\\frac{" + ratio.group(1) + "}{" + ratio.group(2) + "}"
    if _NUMBER.fullmatch(s):
        sign, digits = ("-", s[1:]) if s.startswith("-") else ("", s)
        whole, _, frac = digits.partition(".")
        whole = whole.lstrip("0") or "0"
        frac = frac.rstrip("0")
        s = sign + whole + ("." + frac if frac else "")
        if s == "-0":
            s = "0"
    if s == "0.5":
        s = "\\frac{1}{2}"
    return s


def grade_boxed_exact(response: str, gold: str) -> float:
    """1.0 when the last ``\\boxed{...}`` of the response equals ``gold`` after `normalize_boxed`, else 0.0.

    Thinking is stripped first; no box, or an unclosed last box, scores 0. This is the string rule of the
    paper's lm-eval MATH-500 and OlympiadBench tasks; `grade_math` (math-verify equivalence) also accepts
    answers that are equal but written differently (``0.25`` and ``\\frac14``, ``(1,2)`` with spaces, ...).
    """
    boxed = last_boxed(strip_thinking(response))
    if boxed is None:
        return 0.0
    norm = normalize_boxed(boxed)
    return 1.0 if norm and norm == normalize_boxed(gold) else 0.0
