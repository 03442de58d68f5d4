"""The demo's built-in corpus, generated here deterministically: templated math problems with worked answers and
general-domain instructions with responses (no downloads, no shipped data files)."""
from __future__ import annotations

import random

_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "shells"]
_PLACES = ["the museum", "the library", "the station", "the market", "the harbour", "the park"]
_TIMES = ["nine in the morning", "noon", "three in the afternoon", "six in the evening"]
_TOPICS = ["the weather", "a train timetable", "a recipe for bread", "a river's course", "a committee vote"]


def math_records(n: int = 24, seed: int = 0) -> list[dict]:
    """{"prompt", "response"} word problems: sums, products, linear equations, with the worked answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        who, what = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = i % 3
        if kind == 0:
            prompt = f"{who} has {a} {what} and finds {b} more. How many {what} does {who} have now?"
            resp = f"{who} starts with {a} {what} and adds {b}, so {a} + {b} = {a + b}. The answer is {a + b}."
        elif kind == 1:
            prompt = f"There are {c} boxes with {a} {what} in each box. How many {what} are there in total?"
            resp = f"Each of the {c} boxes holds {a} {what}, so {c} × {a} = {c * a}. The answer is {c * a}."
        else:
            rhs = c * a + b
            prompt = f"Solve for x: {c}x + {b} = {rhs}."
            resp = f"Subtract {b} from both sides: {c}x = {rhs - b}. Divide by {c}: x = {a}. The answer is {a}."
        out.append({"prompt": prompt, "response": resp})
    return out


def general_records(n: int = 24, seed: int = 1) -> list[dict]:
    """{"prompt", "response"} everyday instructions and answers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        place, time, topic, who = rng.choice(_PLACES), rng.choice(_TIMES), rng.choice(_TOPICS), rng.choice(_NAMES)
        kind = i % 3
        if kind == 0:
            prompt = f"When does {place} open?"
            resp = f"{place.capitalize()} opens at {time} on weekdays and a little later at weekends."
        elif kind == 1:
            prompt = f"Write one sentence about {topic}."
            resp = f"{who} read about {topic} and explained it to a friend in plain words."
        else:
            prompt = f"Summarise: {who} went to {place} at {time} to ask about {topic}."
            resp = f"{who} visited {place} at {time} with a question about {topic}."
        out.append({"prompt": prompt, "response": resp})
    return out


def corpus_texts(seed: int = 0) -> list[str]:
    """All texts of both datasets (the demo tokenizer is trained on them)."""
    return [r["prompt"] + " " + r["response"] for r in math_records(seed=seed) + general_records(seed=seed + 1)]
