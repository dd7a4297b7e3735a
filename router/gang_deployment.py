"""One Serve deployment replica per gang: it runs the gang supervisor, and its placement group holds
the replica (bundle 0) and every rank (bundles 1..), so Serve treats a gang as one unit.

Requests do not pass through it: each ingress replica's gang pool (`cluster.gang_pool`) asks
`attention()` for the attention workers' handles and streams from them through a `GangClient`.
`status()` carries the epoch, so the pool knows when the gang was rebuilt and its handles changed.
"""

from __future__ import annotations

import os

import ray
from ray import serve

from cluster.config import AppConfig
from cluster.supervisor import GangSupervisor


@serve.deployment
class GangDeployment:
    async def __init__(self, args: dict):
        config = AppConfig.model_validate(args)
        pg = ray.util.get_current_placement_group()
        context = serve.get_replica_context()  # gang-0, gang-1, ...: the gang label of its ranks' metrics
        self.supervisor = GangSupervisor(config.gang_config(), pg=pg, bundle_offset=1 if pg else 0,
                                         name=context.deployment, application=context.app_name)
        await self.supervisor.start()

    def attention(self) -> tuple[int, list]:
        return self.supervisor.attention()

    def status(self) -> dict:
        """Readiness, and the state and restarts the ingress exports (`watch_status` sends it)."""
        startup = self.supervisor.startup
        return {"ready": self.supervisor.ready(), "state": self.supervisor.state, "epoch": self.supervisor.epoch,
                "restarts": self.supervisor.restarts, "stage": startup.stage if startup else None,
                "pid": os.getpid(), "last_recovery_s": self.supervisor.last_recovery_s}

    async def watch_status(self, known: dict | None, wait_s: float) -> dict:
        """`status()` as soon as it differs from `known`, else after `wait_s`: the ingress long-polls
        this, so an idle service exchanges a message per gang every `wait_s` instead of twice a second."""
        status = self.status()
        if status == known:
            await self.supervisor.wait_move(wait_s)
            status = self.status()
        return status

    async def stats(self) -> dict:
        return await self.supervisor.stats()

    async def inject_fault(self, expert_rank: int, steps: int) -> None:
        """Chaos testing: that expert rank's wave step `steps` from now raises."""
        await self.supervisor.gang.experts[expert_rank].inject_fault.remote(steps)

    async def check_health(self) -> None:
        # a failed gang rebuilds itself; only a stopped supervisor asks Serve for a new replica
        if self.supervisor.state == "stopped":
            raise RuntimeError("gang supervisor stopped")

    async def __del__(self):
        await self.supervisor.stop()
