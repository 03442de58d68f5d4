"""The demo's built-in corpus, generated here deterministically: templated math problems with worked answers and
general-domain instructions with responses (no downloads, no shipped data files)."""
from __future__ import annotations

import random

_NAMES = ["Ada", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "shells"]
_PLACES = ["the museum", "the library", "the station", "the market", "the harbour", "the park"]
_TIMES = ["nine in the morning", "noon", "three in the afternoon", "six in the evening"]
_TOPICS = ["the weather", "a train timetable", "a recipe for bread", "a river's course", "a committee vote"]


# (prompt, response) templates, record i of a dataset using kind i % 3; the values come from `_*_values(rng)`
_MATH_KINDS = (
    ("{who} has {a} {what} and finds {b} more. How many {what} does {who} have now?",
     "{who} starts with {a} {what} and adds {b}, so {a} + {b} = {sum}. The answer is {sum}."),
    ("There are {c} boxes with {a} {what} in each box. How many {what} are there in total?",
     "Each of the {c} boxes holds {a} {what}, so {c} × {a} = {product}. The answer is {product}."),
    ("Solve for x: {c}x + {b} = {rhs}.",
     "Subtract {b} from both sides: {c}x = {product}. Divide by {c}: x = {a}. The answer is {a}."),
)
_GENERAL_KINDS = (
    ("When does {place} open?", "{Place} opens at {time} on weekdays and a little later at weekends."),
    ("Write one sentence about {topic}.", "{who} read about {topic} and explained it to a friend in plain words."),
    ("Summarise: {who} went to {place} at {time} to ask about {topic}.",
     "{who} visited {place} at {time} with a question about {topic}."),
)


def _math_values(rng: random.Random) -> dict:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    return {"a": a, "b": b, "c": c, "who": rng.choice(_NAMES), "what": rng.choice(_ITEMS),
            "sum": a + b, "product": c * a, "rhs": c * a + b}


def _general_values(rng: random.Random) -> dict:
    place, time, topic, who = rng.choice(_PLACES), rng.choice(_TIMES), rng.choice(_TOPICS), rng.choice(_NAMES)
    return {"place": place, "Place": place.capitalize(), "time": time, "topic": topic, "who": who}


def _records(n: int, seed: int, values, kinds) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v = values(rng)
        prompt, response = kinds[i % len(kinds)]
        out.append({"prompt": prompt.format(**v), "response": response.format(**v)})
    return out


def math_records(n: int = 24, seed: int = 0) -> list[dict]:
    """{"prompt", "response"} word problems: sums, products, linear equations, with the worked answer."""
    return _records(n, seed, _math_values, _MATH_KINDS)


def general_records(n: int = 24, seed: int = 1) -> list[dict]:
    """{"prompt", "response"} everyday instructions and answers."""
    return _records(n, seed, _general_values, _GENERAL_KINDS)


def corpus_texts(seed: int = 0) -> list[str]:
    """All texts of both datasets (the demo tokenizer is trained on them)."""
    return [r["prompt"] + " " + r["response"] for r in math_records(seed=seed) + general_records(seed=seed + 1)]
