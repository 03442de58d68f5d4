"""Benchmark definitions against the paper's own inputs, CoQA on a fixture of its real format, and grading of
existing responses (matching by order, by id, k samples per doc, and refusal of a file in another order)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from driftscope.eval import benchmarks as B
from driftscope.eval.grade_responses import grade_responses

REPO = Path(__file__).resolve().parents[2]
LOCAL = [b for b in B.BENCHMARKS if b != "coqa"]  # CoQA validation is not in ../shared/data


@pytest.fixture(scope="module")
def bench_dir(shared_data) -> Path:
    return shared_data / "benchmarks"


def _qwen3_user_turn(prompt: str) -> str:  # the paper's inputs: Qwen3 template, thinking off
    from driftscope.engine.tokenizer import compile_template

    source = (REPO / "tests" / "fixtures" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
    return compile_template(source).render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           enable_thinking=False)


def test_shipped_task_yamls_are_the_ones_written_from_the_benchmarks():
    from task_yamls import TASKS_DIR, task_yamls

    want = task_yamls()
    shipped = {p.name: p.read_text(encoding="utf-8") for p in TASKS_DIR.glob("*.yaml")}
    stale = sorted(n for n in want.keys() | shipped.keys() if want.get(n) != shipped.get(n))
    assert not stale, f"{stale} differ from eval/benchmarks.py: run python tests/eval/task_yamls.py"


@pytest.mark.parametrize("name", LOCAL)
def test_every_local_benchmark_loads_with_prompts_and_golds(bench_dir, name):
    b = B.get(name)
    docs = B.load_docs(name, bench_dir)
    expected = {"aime24": 30, "aime25": 30, "math500": 500, "olympiadbench": 675, "gpqa_diamond": 198,
                "livecodebench": 120, "acpbench": 280, "headqa": 2742, "ifeval": 541, "halueval": 30000,
                "mctaco": 9442}
    assert len(docs) == expected[name]
    for d in docs[:: max(1, len(docs) // 7)]:
        assert b.prompt(d).strip()
        if b.kind == "loglikelihood":
            assert 0 <= b.gold(d) < len(b.choices(d))


# IFEval doc 339 ("at least 3 placeholders") is another revision of that prompt in the paper's input data
# ("at least one placeholder"); every other prompt is identical.
@pytest.mark.parametrize("name,file,differ", [("math500", "UniReason-RL_hendrycks_math_500.jsonl", []),
                                              ("ifeval", "UniReason-RL_ifeval.jsonl", [339])])
def test_prompts_equal_the_papers_rendered_inputs(shared_data, bench_dir, name, file, differ):
    docs = B.load_docs(name, bench_dir)
    inputs = [json.loads(line)["input"] for line in open(shared_data / "responses" / file, encoding="utf-8")]
    assert len(inputs) == len(docs)
    assert [i for i, (d, x) in enumerate(zip(docs, inputs)) if _qwen3_user_turn(B.get(name).prompt(d)) != x] == differ


def test_gpqa_option_order_and_gold_letter_match_the_paper(shared_data, bench_dir):
    import re

    docs = B.load_docs("gpqa_diamond", bench_dir)
    rows = [json.loads(line)
            for line in open(shared_data / "responses" / "UniReason-RL_gpqa_diamond_cot_zeroshot.jsonl")]
    for d, r in zip(docs, rows):
        listed = re.search(r"Choices:\n(.*)\nFinish your answer", r["input"], re.S).group(1)
        assert listed == "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", d["options"]))
    letters = {d["gold_letter"] for d in docs}
    assert letters == set("ABCD")  # the shuffle moves the correct answer around


def test_coqa_fixture_in_the_official_layout(tmp_path):
    story = {"id": "s1", "story": "Cotton is a white kitten. She lives in a barn.",
             "questions": [{"input_text": "What color was Cotton?", "turn_id": 1},
                           {"input_text": "Where did she live?", "turn_id": 2}],
             "answers": [{"input_text": "white", "turn_id": 1}, {"input_text": "in a barn", "turn_id": 2}],
             "additional_answers": {"0": [{"input_text": "white"}, {"input_text": "a barn"}],
                                    "1": [{"input_text": "white"}, {"input_text": "barn"}]}}
    (tmp_path / "coqa-dev-v1.0.json").write_text(json.dumps({"version": "1.0", "data": [story]}))
    (doc,) = B.load_docs("coqa", tmp_path)
    prompt = B.get("coqa").prompt(doc)
    assert prompt == ("Cotton is a white kitten. She lives in a barn.\n\nQ: What color was Cotton?\n\nA: white\n\n"
                      "Q: Where did she live?\n\nA:")
    assert doc["golds"] == ["in a barn", "a barn", "barn"]
    # the official CoQA rule: with n golds, the mean over the n leave-one-out sets of the best EM: 0, 1, 1
    assert B.get("coqa").grade(" in a barn", doc) == pytest.approx(2 / 3)
    assert B.get("coqa").grade(" Barn.", doc) == 1.0
    assert B.get("coqa").grade("<think>the barn? no</think> on a farm", doc) == 0.0


def test_grade_responses_on_real_math500_and_gpqa(shared_data, bench_dir, tmp_path):
    res = grade_responses("math500", shared_data / "responses" / "UniReason-RL_hendrycks_math_500.jsonl", tmp_path,
                          data_dir=bench_dir)
    score = res["scores"]["math500"]
    assert 50 < score < 100
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["scores"]["math500"] == score and written["format"] == "driftscope.scores/1"
    rows = [json.loads(line) for line in open(tmp_path / "samples" / "math500.jsonl")]
    assert len(rows) == 500 and abs(100 * sum(r["grades"][0] for r in rows) / 500 - score) < 1e-9
    res = grade_responses("gpqa_diamond", shared_data / "responses" / "UniReason-RL_gpqa_diamond_cot_zeroshot.jsonl",
                          tmp_path, data_dir=bench_dir)
    assert 20 < res["scores"]["gpqa_diamond"] < 100
    assert set(json.loads((tmp_path / "scores.json").read_text())["scores"]) == {"math500", "gpqa_diamond"}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_matching_by_id_by_k_samples_and_refusing_another_order(bench_dir, tmp_path):
    docs = B.load_docs("aime24", bench_dir)
    right = [{"id": d["id"], "output": f"Final Answer: \\boxed{{{d['answer']}}}"} for d in docs]
    res = grade_responses("aime24", _write(tmp_path / "by_id.jsonl", right[::-1]), None, data_dir=bench_dir)
    assert res["scores"]["aime24"] == 100.0
    k2 = []
    for d in docs:  # two samples per doc: one right, one wrong -> 50
        k2 += [{"output": f"\\boxed{{{d['answer']}}}"}, {"output": "\\boxed{-1}"}]
    assert grade_responses("aime24", _write(tmp_path / "k2.jsonl", k2), None,
                           data_dir=bench_dir)["scores"]["aime24"] == 50.0
    swapped = [{"input": B.get("aime24").prompt(d), "output": "x"} for d in docs]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(ValueError, match=r"swapped.jsonl:4: the record's input does not hold aime24 doc 3"):
        grade_responses("aime24", _write(tmp_path / "swapped.jsonl", swapped), None, data_dir=bench_dir)
    with pytest.raises(ValueError, match=r"7 records for 30"):
        grade_responses("aime24", _write(tmp_path / "short.jsonl", k2[:37]), None, data_dir=bench_dir)
    with pytest.raises(ValueError, match="scored by log-likelihood"):
        grade_responses("headqa", tmp_path / "k2.jsonl", None, data_dir=bench_dir)
    with pytest.raises(FileNotFoundError, match="aime24: .*nowhere/aime24.jsonl not found"):
        grade_responses("aime24", tmp_path / "k2.jsonl", None, data_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["acpbench", "gpqa_diamond", "halueval", "olympiadbench", "aime25"])
def test_gold_scores_one_and_a_wrong_answer_zero_on_every_real_item(bench_dir, name):
    b = B.get(name)
    docs = B.load_docs(name, bench_dir)
    docs = docs[::50] if name == "halueval" else docs[::7] if name == "olympiadbench" else docs
    for d in docs:
        if name in ("acpbench", "gpqa_diamond"):
            gold = str(b.gold(d)).strip()
            wrong = next(x for x in "ABCD" if x != gold)
            right_text, wrong_text = (f"Step 1: ... **Final Answer**: {gold}.", f"**Final Answer**: {wrong}.") \
                if name == "acpbench" else (f"Final Answer: \\boxed{{{gold}}}", f"Final Answer: \\boxed{{{wrong}}}")
        elif name == "halueval":
            gold = b.gold(d)
            right_text, wrong_text = f"<think>hmm</think>{gold}", ("No" if gold == "Yes" else "Yes")
        else:
            gold = d["final_answer"][0] if name == "olympiadbench" else str(d["answer"])
            if name == "olympiadbench" and d.get("is_multiple_answer") and len(d["final_answer"]) > 1:
                gold = ", ".join(d["final_answer"])
            right_text, wrong_text = f"Final Answer: \\boxed{{{gold.strip('$')}}}", "Final Answer: \\boxed{\\pi^{17}+3}"
        assert b.grade(right_text, d) == 1.0, (name, d.get("id"), right_text)
        assert b.grade(wrong_text, d) == 0.0, (name, d.get("id"), wrong_text)
