"""`maverick generate`: offline greedy generation for a batch of prompts, one JSON object per prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.loader import load_pretrained, resolve_dtype
from model.generate import greedy_generate
from model.tokenizer import Tokenizer, load_generation_defaults


def _check_local(model_dir: str) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        hint = " (hub ids are not downloaded: pass a local directory)" if "/" in model_dir else ""
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist{hint}")
    return path


def run_generate(args: argparse.Namespace, prompts: list[tuple[str, object]]) -> list[dict]:
    model_dir = _check_local(args.model)
    needs_text = any(kind == "text" for kind, _ in prompts)
    tokenizer = Tokenizer(model_dir) if needs_text or (model_dir / "tokenizer.json").is_file() else None
    token_prompts = []
    for kind, value in prompts:
        if kind == "ids":
            token_prompts.append(list(value))  # verbatim: no BOS added
        elif args.chat:
            token_prompts.append(tokenizer.encode_chat([{"role": "user", "content": value}]))
        else:
            token_prompts.append(tokenizer.encode(value))
    defaults = load_generation_defaults(model_dir)
    model = load_pretrained(model_dir, resolve_dtype(args.dtype))
    outputs = greedy_generate(model, token_prompts, args.max_tokens, set(defaults.eos_token_ids))
    return [{"token_ids": out, "text": tokenizer.decode(out) if tokenizer else None} for out in outputs]
