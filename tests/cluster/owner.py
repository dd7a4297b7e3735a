"""A stand-in for a gang's Serve replica: a named actor whose supervisor writes its gang down, so the
gang outlives the actor (`cluster.gang_registry`). Kept apart from the test modules so a worker
imports only this."""

import os

import ray

from cluster.gang_registry import GangRegistry, fingerprint
from cluster.supervisor import GangSupervisor
from workers.protocol import GenerateRequest


@ray.remote(num_cpus=0)
class Owner:
    async def start(self, config, application: str) -> str:
        runtime = ray.get_runtime_context()
        registry = GangRegistry(application, runtime.current_actor, fingerprint(config))
        self.supervisor = GangSupervisor(config, name=f"gang-{runtime.get_actor_name()}", application=application,
                                         registry=registry)
        await self.supervisor.start()
        return self.supervisor.name

    async def generate(self, prompt: list[int], params) -> list[int]:
        ids = []
        async for out in self.supervisor.generate(GenerateRequest(prompt, params)):
            ids += out.new_token_ids
        return ids

    async def stats(self) -> dict:
        return await self.supervisor.stats()

    def pid(self) -> int:
        return os.getpid()
