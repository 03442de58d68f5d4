"""load_tokenizer(path) -> Tokenizer: HF `tokenizer.json` via the `tokenizers` library, plus special tokens and the
chat template.

Chat templates are untrusted code from the Hub: they render in jinja2's ImmutableSandboxedEnvironment, as transformers
does (trim_blocks/lstrip_blocks, raise_exception, tojson, strftime_now); touching Python internals raises SecurityError.
"""
from __future__ import annotations

import functools
import json
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from driftscope.errors import InputError
from driftscope.util import read_json

__all__ = ["Tokenizer", "load_tokenizer", "SecurityError", "TemplateError", "ChatTemplateError"]


class ChatTemplateError(InputError):
    """The chat template itself is broken (it does not compile, or the sandbox blocks it): every record would fail
    alike, so it is never skipped per record. Other render errors (raise_exception, an undefined value) are
    InputErrors about the one record."""


def _template_line(exc: BaseException) -> int | None:
    """The template line a render error came from (jinja rewrites the traceback to the template's lines)."""
    return next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__)) if f.filename == "<template>"),
                None)


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (a route to Python internals)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attributes, got {name!r}")


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so the sandbox never sees rich objects (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The sandboxed template for `source`, compiled once per source (rendering is what a prompt costs)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env.from_string(source)


def _token_str(value: Any) -> str | None:
    """tokenizer_config special tokens are strings or AddedToken dicts {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`, {} when the (optional) file is absent."""
    return read_json(path, what, dict) if path.is_file() else {}


def _find_templates(root: Path, config: dict) -> tuple[dict[str, str], str | None]:
    """name -> template source; chat_template.jinja wins over tokenizer_config.json's chat_template."""
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}, str(jinja_file)
    t = config.get("chat_template")
    src = str(root / "tokenizer_config.json")
    if t is None:
        return {}, None
    if isinstance(t, str):
        return {"default": t}, src
    if isinstance(t, list) and all(isinstance(x, dict) and "name" in x and "template" in x for x in t):
        return {x["name"]: x["template"] for x in t}, src
    raise ValueError(f"{src}: chat_template must be a string or a list of {{name, template}} objects")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the special tokens and chat template of the checkpoint.

    Built from parts (`load_tokenizer` reads them from a checkpoint folder or a GGUF file): `tok`, the
    `tokenizers.Tokenizer`; `path`, what messages name; special token strings and ids; every id that ends generation;
    the chat templates (name -> source) and where they came from."""

    def __init__(self, tok, path: str | Path, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, eos_token_ids: tuple[int, ...] = (),
                 chat_template: dict[str, str] | None = None, chat_template_source: str | None = None):
        self._tok, self.path = tok, Path(path)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template, self.chat_template_source = dict(chat_template or {}), chat_template_source

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.jinja) of a folder."""
        from tokenizers import Tokenizer as _HFTokenizer

        root = Path(path)
        tjson = root / "tokenizer.json" if root.is_dir() else root
        if not tjson.is_file():
            raise FileNotFoundError(f"{tjson}: tokenizer.json not found (only fast tokenizers are supported)")
        root = tjson.parent
        try:
            tok = _HFTokenizer.from_file(str(tjson))
        except Exception as e:  # the tokenizers library raises a bare Exception for a damaged file
            raise InputError(f"{tjson}: not a valid tokenizer.json ({e}); the file is damaged or truncated") from e
        config = _read_json(root / "tokenizer_config.json", "tokenizer config")
        gen = _read_json(root / "generation_config.json", "generation config")

        def id_of(what: str) -> int | None:
            token = _token_str(config.get(what))
            if token is None:
                return None
            if (tid := tok.token_to_id(token)) is None:
                raise ValueError(f"{root / 'tokenizer_config.json'}: {what}={token!r} is not in the vocabulary")
            return tid

        bos_id, eos_id, pad_id = id_of("bos_token"), id_of("eos_token"), id_of("pad_token")
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos_id is None and gen_eos:
            eos_id = gen_eos[0]
        if bos_id is None and isinstance(gen.get("bos_token_id"), int):
            bos_id = gen["bos_token_id"]
        if pad_id is None and isinstance(gen.get("pad_token_id"), int):
            pad_id = gen["pad_token_id"]
        own_eos = [eos_id] if eos_id is not None else []  # every id that ends generation: eos + generation_config's
        templates, source = _find_templates(root, config)
        return cls(tok, root, bos_token=_token_str(config.get("bos_token")),
                   eos_token=_token_str(config.get("eos_token")), pad_token=_token_str(config.get("pad_token")),
                   unk_token=_token_str(config.get("unk_token")), bos_token_id=bos_id, eos_token_id=eos_id,
                   pad_token_id=pad_id, eos_token_ids=tuple(dict.fromkeys(own_eos + gen_eos)),
                   chat_template=templates, chat_template_source=source)

    # ------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        """Size of the id space including added/special tokens (ids run 0..vocab_size-1)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        """token -> id for every id, added/special tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the checkpoint's template (or a named one / an explicit source string).

        `enable_thinking` reaches the template only when not None, so templates that test `is defined` behave
        as in transformers. Special token strings (bos_token, eos_token, ...) are available to the template.
        """
        source = self._template_source(chat_template)
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "unk_token": self.unk_token}
        context: dict[str, Any] = {k: v for k, v in specials.items() if v is not None}
        context.update(_plain(kwargs))
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        where = self.chat_template_source if source in self.chat_template.values() else "the chat_template argument"
        try:
            template = compile_template(source)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"{where}: the chat template does not compile: line {e.lineno}: {e.message}") from e
        messages = [{k: v for k, v in m.items() if v is not None} for m in _plain(list(messages))]
        try:
            text = template.render(messages=messages, tools=_plain(context.pop("tools", None)),
                                   documents=_plain(context.pop("documents", None)),
                                   add_generation_prompt=add_generation_prompt, **context)
        except SecurityError as e:
            why = f"chat template line {_template_line(e)}: the sandbox blocks it: {e}"
            raise ChatTemplateError(f"{where}: {why}") from e
        except (TemplateError, TypeError) as e:
            raise InputError(f"{where}: chat template line {_template_line(e)}: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template_source(self, chat_template: str | None) -> str:
        if chat_template is not None and chat_template in self.chat_template:
            return self.chat_template[chat_template]
        if chat_template is not None and ("{%" in chat_template or "{{" in chat_template):
            return chat_template
        if chat_template is not None:
            raise ValueError(f"chat_template={chat_template!r} is neither a template nor one of "
                             f"{sorted(self.chat_template)}")
        if not self.chat_template:
            looked = ("tokenizer.chat_template in its metadata" if self.path.is_file() else
                      "chat_template.jinja and 'chat_template' in tokenizer_config.json")
            raise ValueError(f"{self.path}: no chat template (looked for {looked})")
        if "default" in self.chat_template:
            return self.chat_template["default"]
        if len(self.chat_template) == 1:
            return next(iter(self.chat_template.values()))
        raise ValueError(f"{self.chat_template_source}: several chat templates {sorted(self.chat_template)} and none "
                         "is 'default'; pass chat_template=NAME")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder (tokenizer.json, tokenizer_config.json, generation_config.json) or of
    a GGUF file (its tokenizer.ggml.* metadata and tokenizer.chat_template, engine/gguf_tokenizer.py)."""
    from driftscope.engine import gguf

    if gguf.is_gguf(path):
        from driftscope.engine.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(Path(path), Tokenizer)
    return Tokenizer.from_folder(path)
