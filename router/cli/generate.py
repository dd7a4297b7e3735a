"""`maverick generate`: offline greedy generation for a batch of prompts, one JSON object per prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.tokenizer import Tokenizer
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
    tokenizer = Tokenizer(model_dir) if has_tokenizer else None
    token_prompts = []
    for kind, value in prompts:
        if kind == "ids":
            token_prompts.append(list(value))  # verbatim: no BOS added
        elif args.chat:
            token_prompts.append(tokenizer.encode_chat([{"role": "user", "content": value}]))
        else:
            token_prompts.append(tokenizer.encode(value))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)  # greedy; stops at the EOS ids
    if args.expert_workers or args.attention_workers > 1:
        return _through_gang(args, model_dir, token_prompts, params, has_tokenizer)
    llm = LLM(model_dir, EngineConfig(dtype=args.dtype), skip_tokenizer_init=not has_tokenizer)
    return [{"token_ids": r.outputs[0].token_ids, "text": r.outputs[0].text}
            for r in llm.generate(token_prompts, params)]


def _through_gang(args, model_dir: Path, prompts: list[list[int]], params: SamplingParams,
                  has_tokenizer: bool) -> list[dict]:
    from pydantic import ValidationError

    from cluster.config import GangConfig, describe
    from cluster.offline import generate_with_gang

    try:
        config = GangConfig(model=str(model_dir.resolve()), attention_workers=args.attention_workers,
                            expert_workers=args.expert_workers, dtype=args.dtype,
                            skip_tokenizer_init=not has_tokenizer)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None
    return generate_with_gang(config, prompts, params)
