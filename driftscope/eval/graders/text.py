"""Text helpers shared by the graders: drop a thinking block, take the last \\boxed{...}, pull out a choice letter.

Pure string functions, no optional dependencies; each grader strips thinking before it extracts anything.
"""
from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def strip_thinking(text: str) -> str:
    """The response with its thinking removed.

    - With a ``</think>``: everything up to and including the *last* ``</think>`` is dropped and the rest is
      left-stripped (lm-eval's ``postprocess_generated_text`` with ``think_end_token``).
    - With a ``<think>`` but no ``</think>``: the generation never left its thinking (it ran out of tokens), so
      there is no answer: ``""``.
    - With neither tag: the text unchanged.
    """
    cut = text.rfind(THINK_CLOSE)
    if cut >= 0:
        return text[cut + len(THINK_CLOSE):].lstrip()
    if THINK_OPEN in text:
        return ""
    return text


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, or None.

    Braces are matched with nesting (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); a last box that is never
    closed (a truncated response) gives None. The brace-less form ``\\boxed 5`` gives the run of characters after
    the space up to the next whitespace or ``$``.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":
        match = re.match(r" +([^\s$]+)", text[i:])
        return match.group(1) if match else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def _letter_class(letters: str) -> str:
    if not letters or not letters.isalpha() or not letters.isupper() or len(set(letters)) != len(letters):
        raise ValueError(f"letters must be distinct upper-case letters such as 'ABCD', got {letters!r}")
    return "[" + re.escape(letters) + "]"


def _boxed_letter(content: str, cls: str) -> str | None:
    """A letter from a box's content: ``C``, ``(C)``, ``C.``, ``\\text{C}``, ``\\textbf{(C)}``, ``C) 10 eV``."""
    inner = content.strip()
    wrapper = re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf)\{(.*)\}", inner, re.S)
    if wrapper:
        inner = wrapper.group(1).strip()
    match = re.match(rf"[(\[]?\s*({cls})(?![A-Za-z0-9])", inner)
    return match.group(1) if match else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The choice letter a response gives, or None. ``text`` is used as given (strip thinking before).

    Patterns, tried in this order; the first pattern that matches anywhere decides, and within a pattern the
    *last* occurrence in the text wins (a response may quote options before it answers):

    1. the last ``\\boxed{...}``/``\\fbox{...}``, when its content is a letter: ``C``, ``(C)``, ``C.``,
       ``\\text{C}``, ``C) <option text>`` (a box holding a value rather than a letter falls through);
    2. an anchored phrase: the word ``answer``, ``option`` or ``choice`` (singular: ``Options: A. ...`` lists
       options, it does not answer), then ``is``, ``:`` or ``=``, then optionally markdown ``**``, the word
       ``option``/``choice`` and an opening bracket: ``Answer: C``, ``the answer is (C)``,
       ``Final Answer: **B**``, ``**Final Answer**: D.`` (ACPBench's few-shot format: markdown may also sit
       between the word and the separator), ``the correct choice is **Choice A**``; anchor words are
       case-insensitive;
    3. a letter in brackets: ``(C)`` or ``[C]``;
    4. a last line that is only the letter: ``C`` or ``C.``.

    Letters are matched upper-case only ("a" is an English word) and must stand alone (``Cl`` is not ``C``).
    """
    cls = _letter_class(letters)
    boxed = last_boxed(text)
    if boxed is not None:
        letter = _boxed_letter(boxed, cls)
        if letter is not None:
            return letter
    anchored = re.findall(
        rf"\b(?i:answer|option|choice)[*_]*\s*(?:(?i:is)|:|=)\s*:?\s*[*_]*\s*(?:(?i:option|choice)\s*)?[*_]*\s*[(\[]?\s*"
        rf"({cls})(?![A-Za-z0-9'\-])", text)
    if anchored:
        return anchored[-1]
    bracketed = re.findall(rf"[(\[]({cls})[)\]]", text)
    if bracketed:
        return bracketed[-1]
    lines = text.strip().splitlines()
    if lines:
        match = re.fullmatch(rf"[*_\s]*({cls})[.)*_\s]*", lines[-1])
        if match:
            return match.group(1)
    return None
