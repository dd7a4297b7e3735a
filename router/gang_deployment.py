"""The `gangs` deployment: each replica is one gang. It runs the gang supervisor; Serve's controller
decides how many gangs run (`num_gangs`, or `autoscaling` from the load each gang reports in
`record_autoscaling_stats`, `cluster.autoscale`).

The gang's ranks run in a detached placement group of their own and outlive the replica: when it
dies, the replica Serve starts in its place takes the running gang over (`cluster.gang_registry`), so
the streams on it go on untouched.

Requests do not pass through it: each ingress replica's gang pool (`cluster.gang_pool`) reads every
gang's `status()` (broadcast), asks a gang's `attention()` for its attention workers' handles and
streams from them through a `GangClient`. `status()` carries the gang's id and epoch, so the pool
knows gangs that arrive, leave or were rebuilt.

A gang Serve stops (scaled down, redeployed, shut down) first drains (`__del__`): it takes no new
request, lets running ones finish within the grace, and ends the rest with `Draining`, which the
ingress resumes on another gang token-exactly.
"""

from __future__ import annotations

import os

import ray
from ray import serve

from cluster.autoscale import CAPACITY, REQUESTS
from cluster.config import AppConfig
from cluster.gang_registry import GangRegistry, fingerprint
from cluster.supervisor import GangSupervisor


@serve.deployment
class GangDeployment:
    async def __init__(self, args: dict):
        config = AppConfig.model_validate(args)
        context, runtime = serve.get_replica_context(), ray.get_runtime_context()
        gang_config = config.gang_config()
        registry = GangRegistry(context.app_name, runtime.current_actor, fingerprint(gang_config))
        # the gang's id for its whole life (Serve's replica ranks are renumbered when replicas leave):
        # the label of its ranks' metrics, and how every ingress tells gangs apart; a gang taken over
        # keeps the id it had
        self.drain_grace_s = config.autoscaling.drain_grace_s if config.autoscaling else 0.0
        self.max_num_seqs = config.engine.max_num_seqs
        self.supervisor = GangSupervisor(gang_config, name=f"gang-{context.replica_id.unique_id}",
                                         application=context.app_name, registry=registry)
        await self.supervisor.start()
        self.name = self.supervisor.name

    def attention(self) -> tuple[int, list]:
        return self.supervisor.attention()

    def attention_of(self) -> dict:
        """`attention()` with this gang's id (the ingress broadcasts it and keeps each gang's answer);
        epoch None while it cannot serve."""
        try:
            epoch, handles = self.supervisor.attention()
        except Exception:
            return {"gang": self.name, "epoch": None, "attention": []}
        return {"gang": self.name, "epoch": epoch, "version": self.supervisor.attention_version, "attention": handles}

    def status(self) -> dict:
        """Readiness, and the state and restarts the ingress exports (every ingress reads it each second)."""
        startup = self.supervisor.startup
        return {"gang": self.name, "ready": self.supervisor.ready(), "state": self.supervisor.state,
                "failure": self.supervisor.failure,
                "draining": self.supervisor.draining, "epoch": self.supervisor.epoch,
                "restarts": self.supervisor.restarts, "hangs_found": dict(self.supervisor.hangs_found),
                "stage": startup.stage if startup else None,
                "pid": os.getpid(), "last_recovery_s": self.supervisor.last_recovery_s,
                "attention_version": self.supervisor.attention_version,
                "attention_ranks": len(self.supervisor.gang.attention) if self.supervisor.gang else 0}

    async def stats(self) -> dict:
        return {"gang": self.name, **await self.supervisor.stats()}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """This gang's load for Serve's autoscaler (`cluster.autoscale`): its requests, running and
        waiting, and how many it can run at once."""
        gang = self.supervisor.gang
        ranks = len(gang.attention) if gang else self.supervisor.config.attention_workers
        return {REQUESTS: float(await self.supervisor.requests()), CAPACITY: float(self.max_num_seqs * ranks)}

    async def inject_fault(self, expert_rank: int, steps: int) -> None:
        """Chaos testing: that expert rank's wave step `steps` from now raises."""
        await self.supervisor.gang.experts[expert_rank].inject_fault.remote(steps)

    async def check_health(self) -> None:
        # a failed gang rebuilds itself; only a stopped supervisor asks Serve for a new replica
        if self.supervisor.state == "stopped":
            raise RuntimeError("gang supervisor stopped")

    async def __del__(self):
        # Serve stops this gang: no new requests, the running ones finish or move, then the ranks go
        await self.supervisor.drain(self.drain_grace_s)
        await self.supervisor.stop()
