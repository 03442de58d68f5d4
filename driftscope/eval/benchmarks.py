"""The paper's 12 benchmarks: where each one's data lives, its prompt, its decoding and how it is graded.

One `Benchmark` per benchmark, the one place that names it: its display name, its Transferability Index group
(`eval.ti.GROUPS` is read from these), its aliases. The same definitions drive the lm-eval tasks shipped in
`eval/tasks/` (hooks in `eval/tasks/utils.py`, YAMLs written from here by tests/eval/task_yamls.py) and
`driftscope eval --responses` (grading existing responses without a model), so a score means the same thing on
both paths.

Data comes from a local folder laid out like `../shared/data/benchmarks/` (file names in `FILES`), or, when no
folder is given, from the usual Hugging Face dataset (`HF`) through `datasets` (online only).

Prompts and decoding follow the paper (research summary in issue [5]; the MATH500, GPQA and IFEval prompts are
checked against the inputs of the paper's own response files):
- math (MATH500, AIME24/25, OlympiadBench): MATH_PROMPT; temperature 0.6 / top-p 0.95 with k samples
  (AIME 10, MATH500 3) except OlympiadBench (greedy, exact match of the last box); graded by math-verify.
- GPQA-Diamond: options [incorrect 1-3, correct] preprocessed as lm-eval does and shuffled by one
  random.Random(0) in file order (this reproduces all 198 option orders of the paper's response file; the
  paper's text says Random(42), which does not), boxed letter, k=3 sampled.
- LiveCodeBench: LCB's prompt, k=3 sampled, graded in the sandbox (eval/sandbox.py).
- ACPBench: the 7 MCQ tasks, 2-shot chain of thought (lm-eval's acp_*_mcq prompts), greedy, letter extraction.
- HeadQA, MC-TACO: log-likelihood multiple choice (lm-eval's headqa_en and mc_taco prompts), accuracy.
- CoQA: the last question of each story, greedy, EM (F1 in details), thinking removed.
- IFEval: instruction-level strict accuracy, thinking removed.
- HaluEval: qa + dialogue + summarization, each item judged once with its right or hallucinated answer (chosen
  by random.Random(0)), the first line must hold exactly one of Yes/No.
"""
from __future__ import annotations

import csv
import os
import random
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies

from driftscope.eval.graders.choice import grade_choice
from driftscope.eval.graders.coqa import coqa_scores
from driftscope.eval.graders.halueval import grade_halueval
from driftscope.eval.graders.ifeval import grade_ifeval
from driftscope.eval.graders.livecodebench import grade as grade_code
from driftscope.eval.graders.math import grade_boxed_exact, grade_math
from driftscope.util import read_json, read_jsonl

__all__ = ["Benchmark", "BENCHMARKS", "ALIASES", "FILES", "MATH_PROMPT", "get", "canonical_name", "acp_subtask",
           "hub_unreachable", "load_docs", "missing_data"]

MATH_PROMPT = ("Solve the following math problem. Present the final answer in the format: Final Answer: "
               "\\boxed{{your_answer}}.\nProblem: {problem}\nAnswer:")
GPQA_PROMPT = ("What is the correct answer to this question:{question}\n\nChoices:\n{choices}\nFinish your answer with "
               "the format: Final Answer: \\boxed{{X}}, where X is the correct letter choice.\n"
               "Let's think step by step: ")
SAMPLED = {"temperature": 0.6, "top_p": 0.95}
GREEDY = {"temperature": 0.0}
ACP_TASKS = ("act_reach", "app", "just", "land", "prog", "reach", "val")


@dataclass(frozen=True)
class Benchmark:
    name: str
    display: str  # as the TI table and report show it
    group: str  # "math" | "other" | "non": its group in the Transferability Index
    kind: str  # "generate" | "loglikelihood"
    load: Callable[[Path | None], list[dict]]
    prompt: Callable[[dict], str]
    gold: Callable[[dict], Any]
    grade: Callable[[str, dict], float | list[float]] | None = None  # generate: response -> score(s) in [0, 1]
    choices: Callable[[dict], list[str]] | None = None  # loglikelihood: " " + choice is scored; gold is its index
    k: int = 1
    sampling: dict = field(default_factory=lambda: dict(GREEDY))
    until: tuple[str, ...] = ()
    metric: str = "accuracy"
    aliases: tuple[str, ...] = ()  # other names score files use (normalized: see `canonical_name`)


# ------------------------------------------------------------------------------------------------ data files
FILES = {
    "math500": "math500.jsonl", "aime24": "aime24.jsonl", "aime25": "aime25.jsonl",
    "olympiadbench": "olympiadbench.jsonl", "gpqa_diamond": "gpqa_diamond.csv",
    "livecodebench": "livecodebench_sample.jsonl", "acpbench": "acpbench/", "headqa": "headqa_en_test.jsonl",
    "coqa": "coqa-dev-v1.0.json", "ifeval": "ifeval_input_data.jsonl", "mctaco": "mctaco_test.jsonl",
    "halueval": "halueval_{qa,dialogue,summarization}.jsonl[.gz]",
}
HF = {  # used only without a data folder
    "math500": ("HuggingFaceH4/MATH-500", None, "test"), "aime24": ("Maxwell-Jia/AIME_2024", None, "train"),
    "aime25": ("math-ai/aime25", None, "test"),
    "olympiadbench": ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
    "gpqa_diamond": ("Idavidrein/gpqa", "gpqa_diamond", "train"), "ifeval": ("google/IFEval", None, "train"),
    "headqa": ("EleutherAI/headqa", "en", "test"), "mctaco": ("CogComp/mc_taco", None, "test"),
    "livecodebench": ("livecodebench/code_generation_lite", None, "test"),
}


def _path(data_dir: Path, name: str) -> Path:
    p = Path(data_dir) / FILES[name]
    if not p.exists():
        raise FileNotFoundError(f"{name}: {p} not found in the data folder {data_dir} (expected {FILES[name]})")
    return p


def _jsonl(path: Path) -> list[dict]:
    return [row for _, row in read_jsonl(path, "data file")]


def missing_data(name: str, data_dir: str | Path | None) -> str | None:
    """Why benchmark `name` cannot be read from `data_dir` (the first file that is not there; without a folder, no
    Hugging Face copy), or None."""
    if data_dir is None:
        return None if name in HF else "no Hugging Face copy is wired in: it needs --data-dir"
    d = Path(data_dir)
    files = ([d / "acpbench" / f"{t}.json" for t in ACP_TASKS] if name == "acpbench" else
             [d / f"halueval_{part}.jsonl" for part in _HALU_FIELDS] if name == "halueval" else [d / FILES[name]])
    gone = [p for p in files if not (p.is_file() or name == "halueval" and p.with_suffix(".jsonl.gz").is_file())]
    return f"no file at {gone[0]}" if gone else None


def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None: its host (or the https proxy) does not take a
    connection within `timeout` seconds. A quick check, instead of `datasets`' ~30 s of retries."""
    url = urlsplit(getproxies().get("https") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=timeout).close()
    except OSError as e:
        return f"no connection to {url.hostname}: {e.strerror or e}"
    return None


def _hf(name: str) -> list[dict]:
    if name not in HF:
        raise FileNotFoundError(f"{name}: no public Hugging Face copy is wired in; pass --data-dir with {FILES[name]}")
    path, config, split = HF[name]
    way_out = f"pass --data-dir (a folder like ../shared/data/benchmarks, with {FILES[name]}) or go online"
    offline = next((v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
                    if os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")), None)
    if offline is None and (why := hub_unreachable()):
        raise FileNotFoundError(f"{name}: without --data-dir it reads the Hugging Face dataset {path}, and the hub "
                                f"cannot be reached ({why}); {way_out}")
    import datasets

    try:  # with an offline variable set, datasets reads its cache (quickly, without retries)
        return [dict(r) for r in datasets.load_dataset(path, config, split=split)]
    except Exception as e:  # offline and not cached, gated, renamed: one line naming the dataset and the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"{offline} is set and it is not in the cache" if offline else f"{type(e).__name__}: {first[:160]}"
        raise FileNotFoundError(f"{name}: could not load the Hugging Face dataset {path} ({why}); {way_out}") from None


def _loader(name: str, read: Callable[[Path], list[dict]], from_hf: Callable[[list[dict]], list[dict]] | None = None):
    def load(data_dir: Path | None) -> list[dict]:
        if data_dir is None:
            rows = _hf(name)
            return from_hf(rows) if from_hf else rows
        return read(Path(data_dir) if "{" in FILES[name] else _path(data_dir, name))
    return load


# ------------------------------------------------------------------------------------------------ graders
def _math(response: str, doc: dict) -> float:
    return grade_math(response, str(doc["answer"]))


def _olympiad(response: str, doc: dict) -> float:
    golds = doc["final_answer"]
    gold = ", ".join(golds) if doc.get("is_multiple_answer") and len(golds) > 1 else golds[0]
    return grade_boxed_exact(response, gold)


# ------------------------------------------------------------------------------------------------ GPQA
def _gpqa_pre(text: str) -> str:  # lm-eval's gpqa preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _gpqa_docs(rows: list[dict]) -> list[dict]:
    rng = random.Random(0)
    out = []
    for row in rows:
        options = [_gpqa_pre(row[k]) for k in ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3",
                                               "Correct Answer")]
        rng.shuffle(options)
        correct = _gpqa_pre(row["Correct Answer"])
        out.append({"question": row["Question"], "options": options, "gold_letter": "ABCD"[options.index(correct)],
                    "id": row.get("Record ID", "")})
    return out


def _gpqa_read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return _gpqa_docs(list(csv.DictReader(f)))


def _gpqa_prompt(doc: dict) -> str:
    listed = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", doc["options"]))
    return GPQA_PROMPT.format(question=doc["question"], choices=listed)


# ------------------------------------------------------------------------------------------------ others
def _acp_read(folder: Path) -> list[dict]:
    out = []
    for task in ACP_TASKS:
        p = folder / f"{task}.json"
        if not p.is_file():
            raise FileNotFoundError(f"acpbench: {p} not found "
                                    f"(expected one JSON file per task: {', '.join(ACP_TASKS)})")
        out += [dict(d, acp_task=task) for d in read_json(p, "acpbench file", list)]
    return out


def _acp_prompt(doc: dict) -> str:
    from driftscope.eval.acp_fewshot import FEWSHOT

    shots = "".join(f"**Question**: {s['context']}  {s['question']} **Thoughts**: {s['answer']}\n\n"
                    for s in FEWSHOT[doc["acp_task"]]["samples"])
    return shots + f"**Question**: {doc['context']}  {doc['question']} **Thoughts**:"


HALU_INSTRUCTIONS = {
    "qa": ("I want you act as an answer judge. Given a question and an answer, your objective is to determine if the "
           "provided answer contains non-factual or hallucinated information. The answer you give MUST be \"Yes\" or "
           "\"No\".\n\n#Knowledge#: {knowledge}\n#Question#: {question}\n#Answer#: {answer}\n#Your Judgement#:"),
    "dialogue": ("I want you act as a response judge. Given a dialogue history and a response, your objective is to "
                 "determine if the provided response contains non-factual or hallucinated information. The answer you "
                 "give MUST be \"Yes\" or \"No\".\n\n#Knowledge#: {knowledge}\n#Dialogue History#: {dialogue_history}\n"
                 "#Response#: {response}\n#Your Judgement#:"),
    "summarization": ("I want you act as a summary judge. Given a document and a summary, your objective is to "
                      "determine if the provided summary contains non-factual or hallucinated information. The answer "
                      "you give MUST be \"Yes\" or \"No\".\n\n#Document#: {document}\n#Summary#: {summary}\n"
                      "#Your Judgement#:"),
}
_HALU_FIELDS = {"qa": ("right_answer", "hallucinated_answer", "answer"),
                "dialogue": ("right_response", "hallucinated_response", "response"),
                "summarization": ("right_summary", "hallucinated_summary", "summary")}


def _halu_read(folder: Path) -> list[dict]:
    out = []
    for part in ("qa", "dialogue", "summarization"):
        p = folder / f"halueval_{part}.jsonl"
        if not p.is_file():
            p = p.with_suffix(".jsonl.gz")
        if not p.is_file():
            raise FileNotFoundError(f"halueval: {folder}/halueval_{part}.jsonl(.gz) not found")
        rng = random.Random(0)
        right, wrong, key = _HALU_FIELDS[part]
        for i, row in enumerate(_jsonl(p)):
            hallucinated = rng.random() < 0.5
            doc = {k: v for k, v in row.items() if k not in (right, wrong)}
            doc.update({key: row[wrong] if hallucinated else row[right], "gold": "Yes" if hallucinated else "No",
                        "part": part, "id": f"{part}-{i}"})
            out.append(doc)
    return out


def _coqa_read(path: Path) -> list[dict]:
    """The official CoQA JSON (`coqa-dev-v1.0.json`): one doc per story, its last question."""
    data = read_json(path, "CoQA file", dict).get("data")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected the CoQA layout {{\"data\": [stories]}}")
    out = []
    for s, story in enumerate(data):
        qs, ans = story["questions"], story["answers"]
        if not qs or len(qs) != len(ans):
            raise ValueError(f"{path}: data[{s}] has {len(qs)} questions and {len(ans)} answers")
        golds = [ans[-1]["input_text"]] + [extra[-1]["input_text"] for extra in
                                           (story.get("additional_answers") or {}).values() if len(extra) == len(qs)]
        turns = [(q["input_text"], a["input_text"]) for q, a in zip(qs, ans)]
        out.append({"id": story.get("id", str(s)), "story": story["story"], "turns": turns, "golds": golds})
    return out


def _coqa_prompt(doc: dict) -> str:  # lm-eval's coqa doc_to_text, stopped before the gold last answer
    turns = "".join(f"Q: {q}\n\nA: {a}\n\n" for q, a in doc["turns"][:-1])
    return f"{doc['story']}\n\n{turns}Q: {doc['turns'][-1][0]}\n\nA:"


def _lcb_prompt(doc: dict) -> str:
    head = ("You will be given a question (problem specification) and will generate a correct Python program that "
            "matches the specification and passes all tests.\n\nQuestion: " + doc["question_content"] + "\n\n")
    if doc.get("starter_code"):
        return head + ("You will use the following starter code to write the solution to the problem and enclose your "
                       f"code within delimiters.\n```python\n{doc['starter_code']}\n```\n\n")
    return head + ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
                   "on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the "
                   "python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n"
                   "```python\n# YOUR CODE HERE\n```\n\n")


def _mctaco_read(path: Path) -> list[dict]:  # label yes/no as 1/0 (the HF layout already has 0/1)
    return [dict(r, label=1 if r["label"] == "yes" else 0) for r in _jsonl(path)]


def _hf_math(rows):
    return [dict(r, problem=r.get("problem", r.get("Problem")), answer=r.get("answer", r.get("Answer"))) for r in rows]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("aime24", "AIME24", "math", "generate", _loader("aime24", _jsonl, _hf_math),
              lambda d: MATH_PROMPT.format(problem=d["problem"]), lambda d: str(d["answer"]), _math, k=10,
              sampling=dict(SAMPLED), aliases=("aime_24", "aime_2024", "aime2024")),
    Benchmark("aime25", "AIME25", "math", "generate", _loader("aime25", _jsonl, _hf_math),
              lambda d: MATH_PROMPT.format(problem=d["problem"]), lambda d: str(d["answer"]), _math, k=10,
              sampling=dict(SAMPLED), aliases=("aime_25", "aime_2025", "aime2025")),
    Benchmark("math500", "MATH500", "math", "generate", _loader("math500", _jsonl),
              lambda d: MATH_PROMPT.format(problem=d["problem"]), lambda d: str(d["answer"]), _math, k=3,
              sampling=dict(SAMPLED), aliases=("math_500", "hendrycks_math500", "hendrycks_math_500",
                                               "minerva_math500", "minerva_math_500")),
    Benchmark("olympiadbench", "Olympiad", "math", "generate", _loader("olympiadbench", _jsonl),
              lambda d: MATH_PROMPT.format(problem=d["question"]), lambda d: d["final_answer"], _olympiad,
              aliases=("olympiad", "olympiad_bench", "olympiadbench_en")),
    Benchmark("gpqa_diamond", "GPQA", "other", "generate", _loader("gpqa_diamond", _gpqa_read, _gpqa_docs),
              _gpqa_prompt, lambda d: d["gold_letter"], lambda r, d: grade_choice(r, d["gold_letter"]), k=3,
              sampling=dict(SAMPLED), aliases=("gpqa", "gpqadiamond", "gpqa_diamond_cot_zeroshot",
                                               "gpqa_diamond_zeroshot", "gpqa_diamond_n_shot",
                                               "gpqa_diamond_cot_n_shot", "gpqa_diamond_generative_n_shot")),
    Benchmark("livecodebench", "LCB", "other", "generate", _loader("livecodebench", _jsonl), _lcb_prompt,
              lambda d: None, lambda r, d: float(grade_code(r, d)["pass"]), k=3, sampling=dict(SAMPLED),
              metric="pass@1", aliases=("lcb", "live_code_bench", "livecodebench_v5")),
    Benchmark("acpbench", "ACPBench", "other", "generate", _loader("acpbench", _acp_read), _acp_prompt,
              lambda d: d["answer"], lambda r, d: grade_choice(r, str(d["answer"]).strip()),
              until=("\n\n\n\n", "**Question**:", "**Question:**", "Q:"), aliases=("acp", "acp_bench")),
    Benchmark("headqa", "HeadQA", "other", "loglikelihood", _loader("headqa", _jsonl),
              lambda d: f"Question: {d['qtext']}\nAnswer:", lambda d: int(d["ra"]) - 1,
              choices=lambda d: [a["atext"] for a in d["answers"]], aliases=("headqa_en", "head_qa", "head_qa_en")),
    Benchmark("coqa", "CoQA", "non", "generate", _loader("coqa", _coqa_read), _coqa_prompt, lambda d: d["golds"],
              lambda r, d: coqa_scores(r, d["golds"])["em"], until=("\nQ:",), metric="exact match"),
    Benchmark("ifeval", "IFEval", "non", "generate", _loader("ifeval", _jsonl), lambda d: d["prompt"],
              lambda d: d["instruction_id_list"],
              lambda r, d: list(map(float, grade_ifeval(d, r)["inst_level_strict"])),
              metric="instruction-level strict accuracy"),
    Benchmark("halueval", "HaluEval", "non", "generate", _loader("halueval", _halu_read),
              lambda d: HALU_INSTRUCTIONS[d["part"]].format(**d),
              lambda d: d["gold"], lambda r, d: grade_halueval(r, d["gold"]), aliases=("halu_eval", "halueval_qa")),
    Benchmark("mctaco", "MC-TACO", "non", "loglikelihood", _loader("mctaco", _mctaco_read),
              lambda d: f"{d['sentence']}\nQuestion: {d['question']}\nAnswer: {d['answer']}\nPlausible:",
              lambda d: int(d["label"]), choices=lambda d: ["no", "yes"], aliases=("mc_taco",)),
]}
# Every name a score file or a task may use for a benchmark, normalized (lower case, runs of "-", " ", "." as "_"):
# its name, driftscope's lm-eval task ds_<name> and its aliases (lm-eval's task names among them). ACPBench's
# per-domain lm-eval tasks are matched by `acp_subtask` instead.
ALIASES: dict[str, str] = {a: b.name for b in BENCHMARKS.values() for a in (b.name, f"ds_{b.name}", *b.aliases)}
assert len(ALIASES) == sum(2 + len(b.aliases) for b in BENCHMARKS.values()), "one alias names two benchmarks"
# lm-eval's ACPBench tasks: acp_<domain>_<kind>, kind mcq (mcq_cot_2shot), bool (boolq_cot_2shot) or gen.
_ACP_SUBTASK = re.compile(r"^acp_([a-z_]+?)_(mcq|bool|gen)$")


def _normalize(name: str) -> str:
    return re.sub(r"[-\s.]+", "_", name.strip().lower())


def canonical_name(name: str) -> str | None:
    """The canonical benchmark for a name or alias ("MC-TACO", "hendrycks_math500", "GPQA-Diamond"), else None."""
    return ALIASES.get(_normalize(name))


def acp_subtask(name: str) -> str | None:
    """"mcq", "bool" or "gen" for one of lm-eval's ACPBench per-domain tasks (acp_app_mcq ...), else None."""
    m = _ACP_SUBTASK.match(_normalize(name))
    return m.group(2) if m else None


def get(name: str) -> Benchmark:
    key = canonical_name(name) or name
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def load_docs(name: str, data_dir: str | Path | None, limit: int | None = None) -> list[dict]:
    docs = get(name).load(Path(data_dir) if data_dir is not None else None)
    return docs[:limit] if limit is not None else docs


def score_of(values: Sequence[float | list[float]]) -> float:
    """Percent: the mean over docs, each doc's list (IFEval's instructions) flattened into the mean."""
    flat = [float(x) for v in values for x in (v if isinstance(v, list) else [v])]
    return 100.0 * sum(flat) / len(flat) if flat else float("nan")
