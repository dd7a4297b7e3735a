"""A gang that outlives the Serve replica supervising it.

No token passes through a gang's replica: it only builds, watches and rebuilds the gang. So under
Serve the gang's ranks, spares and placement groups are detached from the replica's lifetime, and
the gang is written down in Ray's key-value store (held by the GCS) as a `GangRecord`: its id, epoch,
owner and every handle. When the replica dies, Serve starts a new one; it finds the record whose
owner is gone (`claim_orphan`), checks the ranks and takes over the same gang under the same epoch
and process group. Streams in flight never notice.

Ranks no replica has looked after for `orphan_grace_s` (the owner's lease renewals stopped: its
replica is gone and none came back) remove the whole gang themselves (`clean_orphan`). A replica
Serve stops on purpose drains and destroys its gang and forgets the record.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.experimental import internal_kv

from cluster.gang import Gang, destroy_gang, remove_pg

log = logging.getLogger(__name__)

KV_NAMESPACE = "maverick"
OWNER_ANSWER_S = 5.0  # an owner that answers no ping within this is taken for hung, not dead


@dataclass
class GangRecord:
    name: str  # the gang's id, for its whole life (metrics labels, each ingress's pool)
    owner: object  # the supervising replica's actor handle
    fingerprint: str  # of the gang's config: a replica adopts only a gang built as it would build one
    gang: Gang
    epoch: int = 0
    attention_version: int = 0
    restarts: int = 0
    ready: bool = False  # built and warmed up: a gang that was still building is removed, not adopted


def fingerprint(config) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


class GangRegistry:
    """The records of one Serve application's gangs, written by the replicas that supervise them."""

    def __init__(self, application: str, owner, fingerprint: str):
        """`owner`: the supervising actor's handle (`ray.get_runtime_context().current_actor`)."""
        self.application, self.owner, self.fingerprint = application, owner, fingerprint

    def save(self, record: GangRecord) -> None:
        internal_kv._internal_kv_put(_key(self.application, record.name), ray.cloudpickle.dumps(record),
                                     overwrite=True, namespace=KV_NAMESPACE)

    def forget(self, name: str) -> None:
        internal_kv._internal_kv_del(_key(self.application, name), namespace=KV_NAMESPACE)

    def claim_orphan(self) -> GangRecord | None:
        """A ready gang of this application whose owner is gone, now this registry's owner's; None if
        there is none. Orphans built otherwise (an older config) or never ready are removed here."""
        for key in internal_kv._internal_kv_list(_key(self.application, ""), namespace=KV_NAMESPACE):
            record = _load(key)
            if record is None or _alive(record.owner):
                continue
            if record.fingerprint != self.fingerprint or not record.ready:
                log.warning("gang %s: its replica is gone and it cannot be adopted here (%s): removing it",
                            record.name, "another config" if record.ready else "it never got ready")
                destroy_gang(record.gang)
                internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
                continue
            # one replica takes each orphan: the first to write the claim for this owner wins
            claim = f"claims/{self.application}/{record.name}/{record.owner._actor_id.hex()}"
            if internal_kv._internal_kv_put(claim, self.owner._actor_id.hex(), overwrite=False,
                                            namespace=KV_NAMESPACE):
                continue  # already there: another replica claimed it
            internal_kv._internal_kv_del(f"claims/{self.application}/{record.name}/", del_by_prefix=True,
                                         namespace=KV_NAMESPACE)
            record.owner = self.owner
            self.save(record)
            return record
        return None


def _key(application: str, name: str) -> str:
    return f"gangs/{application}/{name}"


def _load(key: bytes | str) -> GangRecord | None:
    blob = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    if blob is None:
        return None
    try:
        return ray.cloudpickle.loads(blob)
    except Exception as exc:  # written by another version of the code
        log.warning("gang record %s unreadable: %r", key, exc)
        return None


def _alive(owner) -> bool:
    """Whether the owner answers; one that does not answer in time counts as alive (a hung replica is
    killed by Serve's health check, then asked again)."""
    if owner is None:
        return False
    try:
        ray.get(owner.__ray_ready__.remote(), timeout=OWNER_ANSWER_S)
        return True
    except RayActorError:  # dead
        return False
    except GetTimeoutError:
        return True


def clean_orphan(application: str, name: str) -> bool:
    """Called by a rank whose lease ran out. If the gang's owner is gone, the gang is removed (this rank
    with it) and True returned; False while the owner lives (its renewals were late: keep waiting)."""
    key = _key(application, name)
    record = _load(key)
    if record is not None and _alive(record.owner):
        return False
    log.error("gang %s: no replica has looked after it for its grace: removing its ranks", name)
    if record is not None:
        mine = destroy_gang(record.gang, me=ray.get_runtime_context().current_actor)
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
        if mine is not None:
            remove_pg(mine)
    return True
