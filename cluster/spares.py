"""Warm spares: rank processes started beside a running gang, each in a placement-group bundle of its
own, with torch and the model code imported and nothing loaded: `spares` expert ranks and
`attention_spares` attention ranks. When a rank fails, `cluster.gang.recover_gang` hands its place to
a spare of its role (`adopt`), so the replacement costs that rank's weights and a process-group join,
not a process start (measured: 6.7 s of a 8.9 s recovery on 2 cores went to starting the new
process). The spare keeps its bundle, which becomes the rank's home; the next spare starts in the
bundle the failed rank left, so a gang holds its ranks' bundles plus its spares', however often it
recovers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group

from cluster.gang import Gang, bundle_of, kill_actor, remove_pg

log = logging.getLogger(__name__)


@dataclass
class Spare:
    actor: object  # an `ExpertActor` or `AttentionActor`, constructed (process started, imported), nothing loaded
    pg: PlacementGroup
    index: int  # its bundle in `pg`
    role: str = "expert"  # or "attention": the ranks it may replace


def keep_spares(gang: Gang, timeout_s: float = 300) -> int:
    """Start spares until the gang holds as many of each role as its config asks; returns how many it
    started. Blocks (each one is a new process): run it on a thread while the gang serves."""
    started = 0
    # asked again after each start: a rank may have taken a spare of either role meanwhile
    while (role := _lacking(gang)) is not None:
        if not _start_spare(gang, role, timeout_s):
            break
        started += 1
    return started


def _lacking(gang: Gang) -> str | None:
    """The first role (experts first) with fewer spares than the config asks for."""
    config = gang.config
    for role, wanted in (("expert", config.spares), ("attention", config.attention_spares)):
        if sum(s.role == role for s in gang.spares) < wanted:
            return role
    return None


def _start_spare(gang: Gang, role: str, timeout_s: float) -> bool:
    """One spare of `role`; False when the gang was torn down meanwhile."""
    config = gang.config
    with gang.lock:  # `destroy_gang` removes what is in `spare_pgs` when it runs, nothing made after
        if gang.destroyed:
            return False
        left = next((v for v in gang.vacated if v[0] == role), None)
        if left is None:
            resources = config.experts if role == "expert" else config.attention
            pg, index = placement_group([bundle_of(resources)], strategy="PACK", **gang.detached), 0
            gang.spare_pgs.append(pg)
            gang.changed()
        else:
            gang.vacated.remove(left)
            _, pg, index = left
    actor = None
    try:
        if left is None:
            ray.get(pg.ready(), timeout=timeout_s)
        # the last rank of its role's arguments: `adopt` gives it the rank it replaces
        last = config.expert_workers - 1 if role == "expert" else len(gang.ranks) - 1
        actor = gang.start_rank(last, bundle=(pg, index))
        ray.get(actor.load_progress.remote(), timeout=timeout_s)  # constructed: the process is up
    except Exception:
        if actor is not None:
            kill_actor(actor)
        with gang.lock:  # no room now: the group goes (made here) or the bundle waits for the next try
            if left is None and pg in gang.spare_pgs:
                gang.spare_pgs.remove(pg)
                remove_pg(pg)
            elif left is not None:
                gang.vacated.append(left)
        raise
    with gang.lock:
        if not gang.destroyed:
            gang.spares.append(Spare(actor, pg, index, role))
            gang.changed()
            log.info("a warm %s spare is ready (%d in all)", role, len(gang.spares))
            return True
    kill_actor(actor)  # the gang was torn down while this one started (its group went with it)
    return False
