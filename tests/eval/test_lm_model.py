"""The `driftscope` lm-eval model: registration keeps lm-eval's own models, simple_evaluate runs offline on local
tasks, and its log-likelihoods equal those of lm-eval's `hf` model (transformers) on the same requests."""
from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")
from eval_helpers import QUESTIONS, write_model, write_tasks  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-model")
    return write_model(root / "model", std=None), write_tasks(root / "tasks")


def _evaluate(model: str, args: str, tasks_dir, tasks, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), **kw)


def test_registration_keeps_the_builtin_models():
    import driftscope.eval.lm_model  # noqa: F401
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("driftscope").__name__ == "DriftscopeLM"
    assert {"hf", "vllm", "dummy"} <= set(model_registry.keys())  # lazy entries, not imported here
    assert get_model("dummy").__name__ == "DummyLM"


def test_loglikelihoods_equal_transformers(setup):
    pytest.importorskip("transformers")
    import driftscope.eval.lm_model  # noqa: F401

    model, tasks = setup
    ours = _evaluate("driftscope", f"pretrained={model},dtype=float32", tasks, ["tiny_mc", "tiny_ppl"])
    ref = _evaluate("hf", f"pretrained={model},dtype=float32", tasks, ["tiny_mc", "tiny_ppl"], device="cpu",
                    batch_size=2)
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = ours["samples"][task], ref["samples"][task]
        assert len(a) == len(b) == len(QUESTIONS)
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]
            for ra, rb in zip(sa["resps"], sb["resps"]):
                va, vb = ra[0], rb[0]
                if task == "tiny_mc":
                    assert va[0] == pytest.approx(vb[0], rel=1e-4, abs=1e-4)
                    assert va[1] == vb[1]
                else:
                    assert va == pytest.approx(vb, rel=1e-4)
    assert ours["results"]["tiny_mc"]["acc,none"] == ref["results"]["tiny_mc"]["acc,none"]


def test_generate_until_matches_the_engine_greedy(setup):
    import driftscope
    import driftscope.eval.lm_model  # noqa: F401

    model, tasks = setup
    out = _evaluate("driftscope", f"pretrained={model}", tasks, ["tiny_gen"])
    gens = driftscope.generate(model, [q["question"] for q in QUESTIONS], max_new_tokens=8, stop=[".", "<|im_end|>"])
    got = [s["resps"][0][0] for s in out["samples"]["tiny_gen"]]
    docs = [s["doc"]["question"] for s in out["samples"]["tiny_gen"]]
    by_q = {q["question"]: g.text for q, g in zip(QUESTIONS, gens)}
    assert got == [by_q[d] for d in docs]
    assert "exact_match,none" in out["results"]["tiny_gen"]


def test_sampling_kwargs_are_mapped(setup):
    from driftscope.eval.lm_model import DriftscopeLM

    model, _ = setup
    lm = DriftscopeLM(pretrained=str(model), seed=7)
    p = lm._sampling({"until": ["\n\n"], "max_gen_toks": 12, "do_sample": True, "temperature": 0.6, "top_p": 0.95,
                      "top_k": 20}, "r")
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (12, 0.6, 0.95, 20, 7)
    assert p.stop == ("\n\n", "<|im_end|>")
    g = lm._sampling({"do_sample": False, "temperature": 0.6, "top_p": 0.5}, "r")
    assert (g.temperature, g.top_p) == (0.0, 1.0)
    with pytest.raises(ValueError, match="unknown model argument"):
        DriftscopeLM(pretrained=str(model), bogus=1)


def test_repeats_draw_distinct_samples_reproducibly(setup):
    from lm_eval.api.instance import Instance

    from driftscope.eval.lm_model import DriftscopeLM

    model, _ = setup
    lm = DriftscopeLM(pretrained=str(model))
    kw = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    reqs = [Instance("generate_until", {}, ("The capital of France is", kw), i) for i in range(4)]
    a, b = lm.generate_until(reqs, disable_tqdm=True), lm.generate_until(reqs, disable_tqdm=True)
    assert a == b
    assert len(set(a)) > 1


def test_chat_template_and_thinking(setup):
    from driftscope.eval.lm_model import DriftscopeLM

    model, _ = setup
    on = DriftscopeLM(pretrained=str(model), enable_thinking="true")
    off = DriftscopeLM(pretrained=str(model), enable_thinking="false")
    msgs = [{"role": "user", "content": "hi"}]
    assert on.apply_chat_template(msgs) == on.tokenizer.apply_chat_template(msgs, enable_thinking=True)
    assert off.apply_chat_template(msgs) == off.tokenizer.apply_chat_template(msgs, enable_thinking=False)
    assert on.chat_template(True)
