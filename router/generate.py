"""`maverick generate`: offline greedy generation for a batch of prompts, one JSON object per prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.config import EngineConfig
from workers.llm import LLM
from workers.sampling_params import SamplingParams


def _check_local(model_dir: str) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        hint = " (hub ids are not downloaded: pass a local directory)" if "/" in model_dir else ""
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist{hint}")
    return path


def run_generate(args: argparse.Namespace, prompts: list[tuple[str, object]]) -> list[dict]:
    model_dir = _check_local(args.model)
    needs_text = any(kind == "text" for kind, _ in prompts)
    has_tokenizer = (model_dir / "tokenizer.json").is_file()
    if needs_text and not has_tokenizer:
        raise FileNotFoundError(f"{model_dir / 'tokenizer.json'} not found: text prompts need a tokenizer")
    llm = LLM(model_dir, EngineConfig(dtype=args.dtype), skip_tokenizer_init=not has_tokenizer)
    token_prompts = []
    for kind, value in prompts:
        if kind == "ids":
            token_prompts.append(list(value))  # verbatim: no BOS added
        elif args.chat:
            token_prompts.append(llm.tokenizer.encode_chat([{"role": "user", "content": value}]))
        else:
            token_prompts.append(llm.tokenizer.encode(value))
    # greedy; stops at the checkpoint's EOS ids
    outputs = llm.generate(token_prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    return [{"token_ids": out.token_ids, "text": out.text} for out in outputs]
