"""Offline generation through a gang on a local Ray: `maverick generate --expert-workers E`."""

from __future__ import annotations

import asyncio

import ray

from cluster.config import GangConfig
from cluster.local_ray import ensure_local_ray
from cluster.supervisor import GangSupervisor
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams


async def _generate(config: GangConfig, prompts: list[list[int]], params: SamplingParams) -> list[dict]:
    supervisor = GangSupervisor(config, rebuild=False)
    await supervisor.start()

    async def one(prompt: list[int]) -> dict:
        ids, text = [], []
        async for out in supervisor.generate(GenerateRequest(prompt, params)):
            if out.error is not None:
                raise out.error
            ids += out.new_token_ids
            text.append(out.text_delta or "")
        return {"token_ids": ids, "text": "".join(text) if not config.skip_tokenizer_init else None}

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await supervisor.stop()


def generate_with_gang(config: GangConfig, prompts: list[list[int]], params: SamplingParams) -> list[dict]:
    started = ensure_local_ray()
    try:
        return asyncio.run(_generate(config, prompts, params))
    finally:
        if started:
            ray.shutdown()
