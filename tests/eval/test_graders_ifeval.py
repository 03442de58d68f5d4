"""IFEval offline: punkt_tab written from the bundled model with the network off, real Punkt splitting, crafted
responses to real IFEval items that follow or break their instruction, and the real UniReason-RL responses."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("nltk")
pytest.importorskip("punkt")

import nltk  # noqa: E402

from driftscope.eval.graders.ifeval import (  # noqa: E402
    PUNKT_FILES,
    aggregate_ifeval,
    check_ifeval_ready,
    ensure_punkt_tab,
    grade_ifeval,
    nltk_data_dir,
)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("NLTK tried to download"))


@pytest.fixture
def nltk_paths(monkeypatch):
    """Undo what ensure_punkt_tab does to nltk.data.path and $NLTK_DATA."""
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    monkeypatch.delenv("NLTK_DATA", raising=False)


def test_ensure_punkt_tab_in_a_fresh_dir_offline(tmp_path, no_network, nltk_paths):
    from nltk.tokenize.punkt import PunktTokenizer, load_punkt_params
    from punkt.data import english

    root = ensure_punkt_tab(tmp_path / "nltk_data")
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in lang_dir.iterdir()) == sorted(PUNKT_FILES)
    assert nltk.data.path[0] == str(root) and os.environ["NLTK_DATA"].split(os.pathsep)[0] == str(root)
    found = nltk.data.find("tokenizers/punkt_tab/english/")
    assert str(found.path if hasattr(found, "path") else found).startswith(str(root))
    # NLTK reads back exactly the bundled model
    params = load_punkt_params(found)
    assert params.abbrev_types == set(english.ABBREV_TYPES)
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert params.collocations == set(english.COLLOCATIONS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)
    # and splits like Punkt: abbreviations do not end sentences
    tok = PunktTokenizer("english")
    assert tok.tokenize("Dr. Smith went home. He slept.") == ["Dr. Smith went home.", "He slept."]
    assert len(tok.tokenize("Mr. Jones met Mrs. Brown at 5 p.m. on Jan. 3. It rained.")) == 2
    assert nltk.sent_tokenize("Dr. Smith went home. He slept.") == ["Dr. Smith went home.", "He slept."]


def test_ensure_punkt_tab_is_idempotent(tmp_path, nltk_paths):
    root = ensure_punkt_tab(tmp_path)
    files = root / "tokenizers" / "punkt_tab" / "english"
    stamps = {p.name: p.stat().st_mtime_ns for p in files.iterdir()}
    assert ensure_punkt_tab(tmp_path) == root
    assert {p.name: p.stat().st_mtime_ns for p in files.iterdir()} == stamps
    assert nltk.data.path.count(str(root)) == 1
    assert os.environ["NLTK_DATA"].split(os.pathsep).count(str(root)) == 1
    (files / "ortho_context.tab").write_text("")  # a damaged file is rewritten
    ensure_punkt_tab(tmp_path)
    assert (files / "ortho_context.tab").stat().st_size > 100_000


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTSCOPE_NLTK_DATA", str(tmp_path / "env"))
    assert nltk_data_dir() == tmp_path / "env"
    assert nltk_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DRIFTSCOPE_NLTK_DATA")
    assert nltk_data_dir() == Path("~/.cache/driftscope/nltk_data").expanduser().resolve()


def test_lm_eval_ifeval_imports_without_downloading_in_a_fresh_process(tmp_path):
    """In a new interpreter with sockets refused and nltk.download booby-trapped, the readiness check writes the
    data into an empty dir and lm-eval's IFEval checkers import and count sentences with real Punkt."""
    script = textwrap.dedent(f"""
        import socket, sys
        def refuse(*a, **k):
            raise OSError("network disabled")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import nltk
        def trap(*a, **k):
            print("DOWNLOAD ATTEMPTED", a); sys.exit(7)
        nltk.download = trap
        from driftscope.eval.graders.ifeval import check_ifeval_ready
        root = check_ifeval_ready({str(tmp_path / "fresh")!r})
        from lm_eval.tasks.ifeval import instructions_util
        print("sentences", instructions_util.count_sentences("Dr. Smith went home. He slept. Mr. Lee left."))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA", "DRIFTSCOPE_NLTK_DATA")}
    env["HOME"] = str(tmp_path / "home")  # no ~/nltk_data to fall back on
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DOWNLOAD ATTEMPTED" not in proc.stdout and "sentences 3" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ifeval_docs(shared_data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # keep nltk.data.path and $NLTK_DATA as they were afterwards
        mp.setattr(nltk.data, "path", list(nltk.data.path))
        mp.delenv("NLTK_DATA", raising=False)
        check_ifeval_ready(tmp_path_factory.mktemp("nltk_data"))
        path = shared_data / "benchmarks" / "ifeval_input_data.jsonl"
        yield {d["key"]: d for d in map(json.loads, path.open(encoding="utf-8"))}


def _strict(doc, response):
    return grade_ifeval(doc, response)["prompt_level_strict"]


def test_lowercase_item(ifeval_docs):
    doc = ifeval_docs[1051]  # "Write a letter to a friend in all lowercase letters ..."
    assert doc["instruction_id_list"] == ["change_case:english_lowercase"]
    good = "dear sam,\n\nplease go and vote on tuesday. it matters more than you think.\n\nlove, alex"
    assert _strict(doc, good) is True
    assert _strict(doc, good.replace("dear sam", "Dear Sam")) is False
    assert _strict(doc, "<think>I Will Write It In Lowercase.</think>\n\n" + good) is True  # thinking stripped


def test_word_count_items(ifeval_docs):
    less = ifeval_docs[1092]  # fewer than 300 words
    assert less["kwargs"] == [{"relation": "less than", "num_words": 300}]
    assert _strict(less, " ".join(["word"] * 299)) is True
    assert _strict(less, " ".join(["word"] * 300)) is False
    more = ifeval_docs[1072]  # at least 400 words
    assert more["kwargs"] == [{"relation": "at least", "num_words": 400}]
    assert _strict(more, " ".join(["sleep"] * 400)) is True
    assert _strict(more, " ".join(["sleep"] * 399)) is False


def test_sentence_count_uses_real_punkt(ifeval_docs):
    doc = ifeval_docs[3739]  # fewer than 3 sentences
    assert doc["kwargs"] == [{"relation": "less than", "num_sentences": 3}]
    # two sentences to Punkt; a split on every period would count five
    assert _strict(doc, "Dr. Green calls it envy. Mr. Smith agrees.") is True
    assert _strict(doc, "It is envy. It is green. It is jealous.") is False


def test_bullet_item_and_loose_level(ifeval_docs):
    doc = ifeval_docs[102]  # exactly 3 bullet points
    assert doc["kwargs"] == [{"num_bullets": 3}]
    three = "* Ball gown: elegant.\n* Sweats: comfy.\n* Both: laugh."
    result = grade_ifeval(doc, three)
    assert result == {"prompt_level_strict": True, "inst_level_strict": [True],
                      "prompt_level_loose": True, "inst_level_loose": [True]}
    assert grade_ifeval(doc, three + "\n* One more.")["inst_level_strict"] == [False]


def test_multi_instruction_item_lists_each(ifeval_docs):
    doc = ifeval_docs[1535]  # lowercase and fewer than 5 sentences
    assert doc["instruction_id_list"] == ["change_case:english_lowercase", "length_constraints:number_sentences"]
    result = grade_ifeval(doc, "dear hiring team, i would love to guide tours in beijing. thank you.")
    assert result["inst_level_strict"] == [True, True] and result["prompt_level_strict"] is True
    result = grade_ifeval(doc, "Dear team, I would love to guide tours in Beijing. Thank you.")
    assert result["inst_level_strict"] == [False, True] and result["prompt_level_strict"] is False


def test_empty_and_bad_docs(ifeval_docs):
    assert grade_ifeval(ifeval_docs[1051], "<think>only thinking")["inst_level_strict"] == [False]
    with pytest.raises(ValueError, match="instruction_id_list"):
        grade_ifeval({"key": 1, "prompt": "x", "kwargs": []}, "y")


def test_reproducible_and_leaves_global_random_alone(ifeval_docs):
    import random

    doc = ifeval_docs[1122]  # asks for 4 "#", a non-letter, which lm-eval's checker swaps for a random letter
    assert doc["kwargs"][1] == {"let_relation": "at least", "letter": "#", "let_frequency": 4}
    response = " ".join(ch * 4 for ch in "abcdefghijklm")  # half the alphabet 4 times: a coin flip per letter
    results = []
    for seed in range(1, 7):
        random.seed(seed)
        expected_next = random.Random(seed).random()
        results.append(grade_ifeval(doc, response)["inst_level_strict"])
        assert random.random() == expected_next  # the caller's random stream is untouched
    assert results == [results[0]] * 6, results


def test_aggregate_by_hand():
    results = [
        {"prompt_level_strict": True, "inst_level_strict": [True], "prompt_level_loose": True,
         "inst_level_loose": [True]},
        {"prompt_level_strict": False, "inst_level_strict": [True, False, False], "prompt_level_loose": True,
         "inst_level_loose": [True, True, True]},
    ]
    assert aggregate_ifeval(results) == {"prompt_level_strict": 0.5, "inst_level_strict": 0.5,
                                         "prompt_level_loose": 1.0, "inst_level_loose": 1.0}


@pytest.mark.slow
def test_rl_ifeval_responses(shared_data, ifeval_docs):
    docs = list(ifeval_docs.values())
    responses = [json.loads(line) for line in
                 (shared_data / "responses" / "UniReason-RL_ifeval.jsonl").open(encoding="utf-8")]
    assert len(docs) == len(responses) == 541
    assert all(d["prompt"][:100] in r["input"] for d, r in zip(docs, responses))  # input_data order
    acc = aggregate_ifeval(grade_ifeval(d, r["output"]) for d, r in zip(docs, responses))
    print("UniReason-RL IFEval: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()) + " (paper: 70.0)")
    assert 0.4 <= acc["prompt_level_strict"] <= acc["inst_level_strict"] <= 0.85
    assert acc["prompt_level_strict"] <= acc["prompt_level_loose"]
    assert acc["inst_level_strict"] <= acc["inst_level_loose"]
