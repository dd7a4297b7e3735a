"""One Serve deployment replica per gang: it runs the gang supervisor, and its placement group holds
the replica (bundle 0) and every rank (bundles 1..), so Serve treats a gang as one unit.

`generate` streams lists of outputs (every output of a step together: about one message per step),
and ends a request's stream with a typed error as data rather than as an exception, so the ingress
sees the error class itself and not Ray's wrapper of it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import ray
from ray import serve

from cluster.config import AppConfig
from cluster.supervisor import GangSupervisor
from workers.errors import EngineError, InternalError
from workers.protocol import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)


@serve.deployment
class GangDeployment:
    async def __init__(self, args: dict):
        config = AppConfig.model_validate(args)
        pg = ray.util.get_current_placement_group()
        context = serve.get_replica_context()  # gang-0, gang-1, ...: the gang label of its ranks' metrics
        self.supervisor = GangSupervisor(config.gang_config(), pg=pg, bundle_offset=1 if pg else 0,
                                         name=context.deployment, application=context.app_name)
        await self.supervisor.start()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[list[RequestOutput]]:
        try:
            async for batch in self.supervisor.generate_batches(request):
                yield batch
        except EngineError as exc:
            yield [RequestOutput(request.request_id, [], None, "error", error=exc)]
        except Exception as exc:  # a bug: reported typed, logged with the request id
            log.exception("request %s failed in the gang", request.request_id)
            yield [RequestOutput(request.request_id, [], None, "error",
                                 error=InternalError(f"{type(exc).__name__} in the gang"))]

    def ready(self) -> bool:
        return self.supervisor.ready()

    def status(self) -> dict:
        """What the ingress polls twice a second: readiness, and the state and restarts it exports."""
        startup = self.supervisor.startup
        return {"ready": self.supervisor.ready(), "state": self.supervisor.state,
                "restarts": self.supervisor.restarts, "stage": startup.stage if startup else None}

    async def stats(self) -> dict:
        return await self.supervisor.stats()

    async def check_health(self) -> None:
        # a failed gang rebuilds itself; only a stopped supervisor asks Serve for a new replica
        if self.supervisor.state == "stopped":
            raise RuntimeError("gang supervisor stopped")

    async def __del__(self):
        await self.supervisor.stop()
