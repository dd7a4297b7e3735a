"""The `gangs` deployment from a test: each replica is one gang."""

from __future__ import annotations


def gangs(app: str = "maverick"):
    """The deployment's handle: `.remote()` reaches one gang (the only one, in a one-gang app)."""
    from ray import serve

    return serve.get_deployment_handle("gangs", app)


def every_gang_stats(app: str = "maverick") -> list[dict]:
    """Every running gang's `stats()`, in the order the ingress lists them (`routing_stats`: by gang id)."""
    return sorted(gangs(app).broadcast("stats").results(timeout_s=120), key=lambda s: s["gang"])
