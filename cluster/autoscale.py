"""How many gangs the load wants: Serve's autoscaling policy for the `gangs` deployment.

Requests never pass through a gang replica (the ingress streams from its attention workers), so
Serve's own request counts see nothing. Each gang replica reports its load instead
(`record_autoscaling_stats`: running and waiting requests, and its capacity, max_num_seqs x attention
ranks); this policy wants enough gangs that the load is `target_load` of their capacity. Serve applies
min/max, and the upscale and downscale delays, around it.

It runs inside Serve's controller, which imports it by path: standard library only, and it never
raises (a failed decision keeps the count).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("ray.serve")

REQUESTS, CAPACITY = "requests", "capacity"  # the keys of a gang's `record_autoscaling_stats`


def gangs_wanted(requests: float, capacity_per_gang: float, target_load: float, minimum: int) -> int:
    """The fewest gangs that carry `requests` at `target_load` of each one's capacity (at least `minimum`)."""
    if requests <= 0 or capacity_per_gang <= 0:
        return minimum
    return max(minimum, math.ceil(requests / (target_load * capacity_per_gang) - 1e-9))


class GangLoadPolicy:
    """Instantiated once by Serve's controller (`policy_kwargs` are its arguments), called every tick."""

    def __init__(self, target_load: float = 0.75):
        self.target_load = target_load
        self.last: tuple[int, int] | None = None  # (desired, running) last logged

    def __call__(self, ctx) -> tuple[int, dict]:
        try:
            metrics = ctx.aggregated_metrics or {}
            requests, capacity = metrics.get(REQUESTS) or {}, metrics.get(CAPACITY) or {}
            if not capacity:  # no gang has reported yet: keep what runs
                return ctx.target_num_replicas, {}
            total = sum(requests.values())
            desired = gangs_wanted(total, max(capacity.values()), self.target_load,
                                   ctx.capacity_adjusted_min_replicas)
            if (desired, ctx.current_num_replicas) != self.last:
                self.last = (desired, ctx.current_num_replicas)
                log.info("gangs: %.1f requests over %d gangs of capacity %g at target %.2f want %d gangs",
                         total, ctx.current_num_replicas, max(capacity.values()), self.target_load, desired)
            return desired, {"gang_requests": total, "gangs_wanted": desired}
        except Exception:  # never fail Serve's control loop: keep the count
            log.exception("the gang autoscaling policy failed; the gang count stays")
            return ctx.target_num_replicas, {}
