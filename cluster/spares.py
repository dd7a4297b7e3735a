"""Warm spares: expert-rank processes started beside a running gang, each in a placement-group bundle
of its own, with torch and the model code imported and nothing loaded. When an expert rank fails,
`cluster.gang.recover_gang` hands its place to a spare (`ExpertWorker.adopt`), so the replacement
costs that rank's weights and a process-group join, not a process start (measured: 6.7 s of a 8.9 s
recovery on 2 cores went to starting the new process). The spare keeps its bundle, which becomes the
rank's home; the next spare starts in the bundle the failed rank left, so a gang holds its ranks'
bundles plus `spares` more, however often it recovers.
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
    actor: object  # an `ExpertActor`, constructed (its process started and imported), nothing loaded
    pg: PlacementGroup
    index: int  # its bundle in `pg`


def keep_spares(gang: Gang, timeout_s: float = 300) -> int:
    """Start spares until the gang holds `config.spares` of them; returns how many it started. Blocks
    (each one is a new process): run it on a thread while the gang serves."""
    config, started = gang.config, 0
    while len(gang.spares) < config.spares:
        with gang.lock:  # `destroy_gang` removes what is in `spare_pgs` when it runs, nothing made after
            if gang.destroyed:
                break
            own = not gang.vacated
            if own:
                pg, index = placement_group([bundle_of(config.experts)], strategy="PACK"), 0
            else:
                pg, index = gang.vacated.pop(0)
            if own:
                gang.spare_pgs.append(pg)
        actor = None
        try:
            if own:
                ray.get(pg.ready(), timeout=timeout_s)
            # the last expert rank's arguments: `adopt` gives it the rank it replaces
            actor = gang.start_rank(config.expert_workers - 1, bundle=(pg, index))
            ray.get(actor.load_progress.remote(), timeout=timeout_s)  # constructed: the process is up
        except Exception:
            if actor is not None:
                kill_actor(actor)
            with gang.lock:  # no room now: the group goes (made here) or the bundle waits for the next try
                if own and pg in gang.spare_pgs:
                    gang.spare_pgs.remove(pg)
                    remove_pg(pg)
                elif not own:
                    gang.vacated.append((pg, index))
            raise
        with gang.lock:
            if not gang.destroyed:
                gang.spares.append(Spare(actor, pg, index))
                started += 1
                log.info("a warm spare is ready (%d of %d)", len(gang.spares), config.spares)
                continue
        kill_actor(actor)  # the gang was torn down while this one started (its group went with it)
        break
    return started
