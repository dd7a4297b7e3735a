"""An asyncio client of `maverick.v1.Generation.GenerateStream`, as a user would write one: the serving
benchmark drives the gRPC door with it (`cluster/bench` gets it from the CLI, so `cluster/` never
imports `router/`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from router import maverick_v1_pb2 as pb
from router import maverick_v1_pb2_grpc as pb_grpc


class StreamClient:
    """One channel, many concurrent `GenerateStream` calls; `stream` returns (arrival time, tokens) per
    message. Serve routes a gRPC call by the `application` metadata."""

    def __init__(self, target: str, application: str = "maverick", api_key: str | None = None):
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = [("application", application)] + ([("authorization", f"Bearer {api_key}")] if api_key else [])

    async def stream(self, prompt_token_ids: list[int], max_tokens: int, clock: Callable[[], float] = time.perf_counter,
                     ) -> list[tuple[float, int]]:
        request = pb.GenerateRequest(prompt_token_ids=prompt_token_ids, max_tokens=max_tokens, temperature=0.0,
                                     ignore_eos=True)
        arrivals = []
        async for message in self.stub.GenerateStream(request, metadata=self.metadata):
            arrivals.append((clock(), sum(len(c.token_ids) for c in message.choices)))
        return arrivals

    async def close(self) -> None:
        await self.channel.close()
