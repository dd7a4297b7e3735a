"""How many gangs the load wants: Serve's autoscaling policy for the `gangs` deployment.

Requests never pass through a gang replica (the ingress streams from its attention workers), so
Serve's own request counts see nothing. Each gang replica reports its load instead
(`record_autoscaling_stats`: running and waiting requests, and its capacity, max_num_seqs x attention
ranks); this policy wants enough gangs that the load is `target_load` of their capacity. Serve applies
min/max, and the upscale and downscale delays, around it.

It runs inside Serve's controller, which imports it by path: standard library and Ray only, and it
never raises (a failed decision keeps the count). A change of the deployment's target (Serve applied a
decision, after its delays) is logged with the figures behind it and counted as
`maverick_gang_scaling_events_total{direction, reason}`.
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


def scaling_reason(before: int, after: int, wanted: int | None) -> str:
    """Why the target moved from `before` to `after`: the load, when the last decision of this policy
    (`wanted`) pointed that way; else the bounds (a redeploy changed min/max or the replica count)."""
    if wanted is not None and (after - before) * (wanted - before) > 0:
        return "load"
    return "bounds"


class GangLoadPolicy:
    """Instantiated once by Serve's controller (`policy_kwargs` are its arguments), called every tick."""

    def __init__(self, target_load: float = 0.75):
        self.target_load = target_load
        self.target: int | None = None  # the deployment's target at the last tick
        self.figures: tuple[float, float, int, int] | None = None  # requests, capacity, running, desired
        self.events = None  # the Ray counter, made on the first event (the controller's metrics)

    def __call__(self, ctx) -> tuple[int, dict]:
        try:
            self.note_target(ctx)
            metrics = ctx.aggregated_metrics or {}
            requests, capacity = metrics.get(REQUESTS) or {}, metrics.get(CAPACITY) or {}
            if not capacity:  # no gang has reported yet: keep what runs
                return ctx.target_num_replicas, {}
            total = sum(requests.values())
            desired = gangs_wanted(total, max(capacity.values()), self.target_load,
                                   ctx.capacity_adjusted_min_replicas)
            last, self.figures = self.figures, (total, max(capacity.values()), ctx.current_num_replicas, desired)
            if last is None or (desired, ctx.current_num_replicas) != (last[3], last[2]):
                log.info("gangs: %.1f requests over %d gangs of capacity %g at target %.2f want %d gangs",
                         total, ctx.current_num_replicas, max(capacity.values()), self.target_load, desired)
            return desired, {"gang_requests": total, "gangs_wanted": desired}
        except Exception:  # never fail Serve's control loop: keep the count
            log.exception("the gang autoscaling policy failed; the gang count stays")
            return ctx.target_num_replicas, {}

    def note_target(self, ctx) -> None:
        """Serve moved the target since the last tick: log the decision with its figures, and count it."""
        before, after = self.target, ctx.target_num_replicas
        self.target = after
        if before is None or before == after:
            return
        direction = "up" if after > before else "down"
        reason = scaling_reason(before, after, self.figures[3] if self.figures else None)
        requests, capacity, running, _ = self.figures or (float("nan"), float("nan"), ctx.current_num_replicas, 0)
        log.info("gang scaling %s (%s): %d -> %d gangs; %.1f requests over %d gangs of capacity %g, target %.2f",
                 direction, reason, before, after, requests, running, capacity, self.target_load)
        try:
            if self.events is None:
                from ray.util.metrics import Counter

                self.events = Counter("maverick_gang_scaling_events", "Changes of the gang count Serve applied, "
                                      "by direction and reason (load or bounds).",
                                      tag_keys=("application", "direction", "reason"))
            tags = {"application": getattr(ctx, "app_name", None) or "", "direction": direction, "reason": reason}
            self.events.inc(1, tags)
        except Exception:  # metrics are best effort in the controller
            log.exception("could not count the gang scaling event")
