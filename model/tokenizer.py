"""Tokenizer, chat template and generation defaults of a Hugging Face model directory.

The chat template is rendered the way `transformers.apply_chat_template` renders it: a sandboxed
jinja2 environment with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a `tojson`
filter that does not escape HTML, `raise_exception` and `strftime_now`, and the special tokens
(`bos_token`, `eos_token`, ...) as variables. The rendered text is encoded without adding special
tokens, so the template's own BOS is the only one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return value.get("content")
    return value


def _read_chat_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (use --skip-tokenizer-init to serve token ids only)")
        self._tok = HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        tok_config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.special_tokens = {k: _token_text(tok_config.get(k)) for k in SPECIAL_TOKEN_KEYS
                               if tok_config.get(k) is not None}
        source = _read_chat_template(model_dir, tok_config)
        self.chat_template = compile_chat_template(source) if source else None
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.max_chars_per_token = _max_chars_per_token(self._tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def surely_longer_than(self, text: str, tokens: int) -> bool:
        """True when `text` must encode to more than `tokens` tokens, decided from its length alone: no
        token covers more than `max_chars_per_token` characters (a 1 MB prompt is refused in
        microseconds instead of a third of a second of tokenizing beside the engine)."""
        return self.max_chars_per_token is not None and len(text) > tokens * self.max_chars_per_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # the batch call releases the GIL while it works (`encode` holds it: a 1 MB prompt on a server's
        # worker thread stalled its event loop ~0.8 s), and without offsets it is ~1.7x faster; same ids
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The whole tokenizer as `tokenizer.json` text (what grammar libraries build their vocabulary from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, **kwargs: Any) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json / chat_template.jinja)")
        # transformers drops None-valued keys from each message before rendering
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        return self.chat_template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)


def _max_chars_per_token(tok: HFTokenizer) -> int | None:
    """The most text characters one token can cover; None where a normalizer may shorten the text
    first (NFKC composes two characters into one), since the bound then no longer holds."""
    if json.loads(tok.to_str()).get("normalizer") is not None:
        return None
    # a vocabulary entry is at least as long as the text it covers: byte-level entries spell one
    # character per byte, and a text character is at least one byte
    return max(len(entry) for entry in tok.get_vocab(with_added_tokens=True))


@dataclass
class GenerationDefaults:
    """Defaults a request inherits when it leaves a field out, as vLLM takes them from the checkpoint."""

    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, ...

    SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "max_new_tokens")


def load_generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    model_dir = Path(model_dir)
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    text_cfg = cfg.get("text_config") or {}

    def first(key: str) -> Any:
        for source in (gen, cfg, text_cfg):
            if source.get(key) is not None:
                return source[key]
        return None

    eos = first("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    # NOTE: like vLLM, `do_sample` is not consulted: the sampling fields themselves are the defaults
    sampling = {k: gen[k] for k in GenerationDefaults.SAMPLING_KEYS if gen.get(k) is not None}
    return GenerationDefaults(eos_ids, first("bos_token_id"), sampling)
