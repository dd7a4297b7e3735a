"""Build a gang on Ray: placement group, actors, process group, weights.

Ranks 0..E-1 are expert workers, E..E+A-1 attention workers (experts first: attention ranks join and
leave at the end, expert ranks keep their numbers), one bundle each in one placement group (PACK by
default, SPREAD across nodes allowed). Every rank joins the process group at the same time
(rendezvous on rank 0's address and a free port, explicit timeout), then all load their weights in
parallel, then their wave loops start; each stage, the ranks up and the bytes loaded go to a
`GangStartup`. The same code runs with GPUs (NCCL, one GPU per actor) and without (gloo); only the
backend name differs.

A running gang with expert ranks changes its attention side without a rebuild (`grow_attention`,
`shrink_attention`, gloo only): every rank parks at one step boundary the gang agrees on, and all
join a new process group one rank wider or narrower, keeping their processes, weights, engines and
KV caches. A rank past those the gang's placement group was built with gets a one-bundle placement
group of its own.

With a `RankLease` (a gang under Serve), ranks, spares and placement groups are detached: they
outlive the process that built them, each rank removes the gang once its lease runs out, and every
change to the gang is written down through `on_change` (`cluster.gang_registry`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import GangConfig
from cluster.startup import GangStartup
from model.config import load_config
from workers.attention_worker import AttentionWorker
from workers.expert_parallel import Placement
from workers.expert_placement import place_experts, to_rank_table
from workers.expert_worker import ExpertWorker
from workers.rank import MetricsOptions

log = logging.getLogger(__name__)

AttentionActor = ray.remote(AttentionWorker)
ExpertActor = ray.remote(ExpertWorker)
LOAD_POLL_S = 0.5  # how often the ranks' byte counts are read while they load


@dataclass(frozen=True)
class RankLease:
    """Detached ranks: each renews its lease on every call of the supervisor's `renew_lease`; one not
    renewed for `grace_s` (`first_s` before the first renewal: a build's stages) calls `on_orphaned`."""
    grace_s: float
    first_s: float
    on_orphaned: Callable[[], bool]


@dataclass
class Gang:
    config: GangConfig
    experts: list = field(default_factory=list)  # actor handles, rank order: ranks 0..E-1
    attention: list = field(default_factory=list)  # ranks E..E+A-1
    pg: PlacementGroup | None = None
    own_pg: bool = False
    build_seconds: float = 0.0
    loads: list[dict] = field(default_factory=list)
    placement: Placement | None = None  # None: no expert ranks, the attention ranks hold every expert
    capacities: list[int] | None = None  # expert slots per expert rank (spare ones with eplb)
    bundle_offset: int = 0  # rank r runs in bundle r + bundle_offset of `pg`
    metrics: MetricsOptions | None = None
    bundled_ranks: int = 0  # ranks `pg` has a bundle for (those of the build)
    added_pgs: dict[int, PlacementGroup] = field(default_factory=dict)  # rank -> its own, past `bundled_ranks`
    regroups: int = 0  # attention ranks added or removed while it ran
    last_regroup_pause_s: float | None = None  # the last one's pause: parking to the new waves running
    last_regroup_ended: float | None = None  # when that pause ended (`time.monotonic()` of this process)
    last_join_s: float | None = None  # the last rank added: asked to serving (placement, load, regroup)
    homes: dict[int, tuple[PlacementGroup, int]] = field(default_factory=dict)  # rank -> a spare's bundle it took
    spares: list = field(default_factory=list)  # warm rank processes (`cluster.spares.Spare`)
    spares_adopted: int = 0
    vacated: list[tuple[str, PlacementGroup, int]] = field(default_factory=list)  # (role, group, bundle) a spare's
    # adopter left
    spare_pgs: list[PlacementGroup] = field(default_factory=list)  # one-bundle groups made for spares
    destroyed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # `destroyed`, spares and their groups
    lease: RankLease | None = None  # set: detached, outliving its supervisor (see the module doc)
    on_change: Callable[[Gang], None] | None = field(default=None, repr=False)  # writes the gang down

    def __getstate__(self) -> dict:  # a written-down gang: handles and groups, not this process's hooks
        return {k: v for k, v in self.__dict__.items() if k not in ("lock", "on_change")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock(), on_change=None)

    def changed(self) -> None:
        """Its ranks, spares or groups changed: written down again (a gang under Serve)."""
        if self.on_change is not None:
            self.on_change(self)

    @property
    def detached(self) -> dict:
        """The options that make an actor or placement group outlive its creator, when the gang does."""
        return {"lifetime": "detached"} if self.lease is not None else {}

    @property
    def ranks(self) -> list:
        """Every rank's actor, indexed by rank."""
        return self.experts + self.attention

    def home(self, rank: int) -> tuple[PlacementGroup, int]:
        """The placement-group bundle `rank` runs in: a spare's it took, its own group's, or the gang's."""
        if rank in self.homes:
            return self.homes[rank]
        return (self.added_pgs[rank], 0) if rank in self.added_pgs else (self.pg, self.bundle_offset + rank)

    def start_rank(self, rank: int, num_attention: int | None = None,
                   bundle: tuple[PlacementGroup, int] | None = None):
        """A new actor for `rank` in its bundle (at build, replacing a dead one, or joining), in a gang of
        `num_attention` attention ranks (default: those it has). `bundle`: elsewhere (a warm spare's)."""
        config, E = self.config, self.config.expert_workers
        A = num_attention or len(self.attention) or config.attention_workers
        where = _in(*(bundle or self.home(rank)))
        eplb = config.eplb.settings() if config.eplb else None
        if rank >= E:
            engine = config.engine.engine_config(config.dtype, config.device)
            actor = AttentionActor.options(**_resources(config.attention), scheduling_strategy=where,
                                           **self.detached).remote(
                rank, A, E, config.model, engine, config.attention.torch_threads, config.idle_steps,
                config.skip_tokenizer_init, self.metrics, self.placement, eplb, self.capacities)
        else:
            actor = ExpertActor.options(**_resources(config.experts), scheduling_strategy=where,
                                        **self.detached).remote(
                rank, A, E, config.model, self.placement, config.dtype, config.device, config.experts.torch_threads,
                config.idle_steps, self.metrics, eplb, self.capacities)
        if self.lease is not None:  # queued behind the constructor: armed as soon as the process is up
            actor.lease.remote(self.lease.first_s, self.lease.grace_s, self.lease.on_orphaned)
        return actor


def build_gang(config: GangConfig, pg: PlacementGroup | None = None, timeout_s: float = 300,
               bundle_offset: int = 0, name: str = "gang", application: str = "maverick",
               startup: GangStartup | None = None, placement: Placement | None = None,
               lease: RankLease | None = None, on_change: Callable[[Gang], None] | None = None) -> Gang:
    """Start every rank and return once all are loaded and waving. `pg`: an existing placement group
    (a Serve replica's, whose bundle 0 holds the replica itself) where rank r takes bundle
    `r + bundle_offset`; else one is created with a bundle per rank. `startup` follows the stages
    placement, process group and weights (each stage may take `timeout_s`). `placement`: which expert
    ranks hold which experts (default: consecutive experts, as even as the counts allow); every rank
    gets this one table. `lease`, `on_change`: a detached gang (see the module doc)."""
    start = time.monotonic()
    model_config = load_config(config.model)
    config.check_experts(model_config.num_experts)
    A, E = config.attention_workers, config.expert_workers
    # the one placement every rank follows: attention ranks dispatch by it, expert ranks load by it
    capacities = config.expert_capacities(model_config.num_experts) if E else None
    if E:
        expert_ranks = list(range(E))
        placement = placement or initial_placement(config, model_config.moe_layers, model_config.num_experts)
        placement.check(model_config.moe_layers, model_config.num_experts, expert_ranks)
    elif placement is not None:
        raise ValueError("a placement needs expert ranks")
    startup = startup or GangStartup(name, A + E, application)
    startup.enter("placement")
    gang = Gang(config, placement=placement, capacities=capacities, lease=lease, on_change=on_change)
    if pg is None:
        bundles = rank_bundles(config)
        pg = placement_group(bundles, strategy=config.placement_strategy, **gang.detached)
        gang.pg, gang.own_pg = pg, True
        gang.changed()  # written down before anything is waited for: a group left by a dead builder is found
        ray.get(pg.ready(), timeout=timeout_s)
    gang.pg, gang.bundle_offset, gang.bundled_ranks = pg, bundle_offset, A + E
    gang.metrics = (MetricsOptions(name, application, config.metrics.period_s, config.metrics.expert_layer_matrix)
                    if config.metrics.enabled else None)
    gang.experts = [gang.start_rank(rank) for rank in range(E)]
    gang.attention = [gang.start_rank(rank) for rank in range(E, E + A)]
    gang.changed()
    try:
        _wait_ranks_up(gang.ranks, startup, timeout_s)
        startup.enter("process group")
        if E:
            address, port = ray.get(gang.ranks[0].rendezvous_address.remote(), timeout=timeout_s)
            # NOTE: init_process_group blocks until all ranks joined: the calls must be concurrent
            ray.get([r.init_group.remote(address, port, config.collective_timeout_s) for r in gang.ranks],
                    timeout=timeout_s)
        startup.enter("weights")
        gang.loads = _load_weights(gang.ranks, startup, timeout_s)
        for report in gang.loads:
            log.info("rank %(rank)d loaded %(bytes_read)d bytes in %(seconds).1fs", report)
        _start_waves(gang, timeout_s)
    except Exception:
        destroy_gang(gang)
        raise
    gang.build_seconds = time.monotonic() - start
    log.info("gang of %d attention + %d expert workers ready in %.1fs", A, E, gang.build_seconds)
    return gang


def initial_placement(config: GangConfig, moe_layers: list[int], num_experts: int) -> Placement:
    """Consecutive experts per expert rank; with spare slots (eplb), the policy's placement for a
    uniform load instead, so every slot holds an expert from the first step."""
    if not (config.eplb and config.eplb.redundant_experts):
        return Placement.contiguous(moe_layers, num_experts, list(range(config.expert_workers)))
    uniform = place_experts({layer: [1] * num_experts for layer in moe_layers}, config.expert_capacities(num_experts))
    return Placement(to_rank_table(uniform))


def _start_waves(gang: Gang, timeout_s: float, ranks: list | None = None) -> None:
    # a rank with new work while the gang is idle (a request; an expert rank's staged rebalance) wakes
    # every other rank itself
    ranks = gang.ranks if ranks is None else ranks
    ray.get([r.start.remote([p for p in ranks if p is not r]) for r in ranks], timeout=timeout_s)


def grow_attention(gang: Gang, timeout_s: float = 300) -> float:
    """One more attention rank at the end of the running gang's group, loaded while the gang serves;
    then the gang regroups with it (see the module doc). Returns the pause. Raises `ResizeRefused`,
    the gang untouched, when the rank cannot be placed or loaded."""
    _check_resizable(gang)
    start = time.monotonic()
    rank, actor = gang.config.expert_workers + len(gang.attention), None
    try:
        if rank >= gang.bundled_ranks:
            pg = placement_group([bundle_of(gang.config.attention)], strategy="PACK", **gang.detached)
            gang.added_pgs[rank] = pg
            gang.changed()
            ray.get(pg.ready(), timeout=timeout_s)
        actor = gang.start_rank(rank, len(gang.attention) + 1)
        startup = GangStartup(f"rank-{rank}", 1)  # not published: the gang serves meanwhile
        _wait_ranks_up([actor], startup, timeout_s)
        _load_weights([actor], startup, timeout_s)
    except Exception as exc:
        if actor is not None:
            kill_actor(actor)
        _remove_added_pg(gang, rank)
        raise ResizeRefused(f"no attention rank {rank} could join: {type(exc).__name__}: {exc}") from exc
    pause = _regroup(gang, gang.ranks + [actor], gang.ranks, timeout_s)
    gang.attention.append(actor)
    gang.changed()
    gang.last_join_s = time.monotonic() - start
    return pause


def shrink_attention(gang: Gang, timeout_s: float = 300) -> float:
    """The gang's last attention rank leaves (it holds no request: `AttentionWorker.evict` first); the
    others regroup without it. Returns the pause."""
    check_shrinkable(gang)
    leaving = gang.attention[-1]
    rank = len(gang.ranks) - 1
    staying = gang.ranks[:-1]
    pause = _regroup(gang, staying, gang.ranks, timeout_s)
    gang.attention.pop()
    kill_actor(leaving)
    _remove_added_pg(gang, rank)
    gang.changed()
    return pause


class ResizeRefused(RuntimeError):
    """The gang cannot change its attention side now; it serves on as it was."""


def _check_resizable(gang: Gang) -> None:
    if not gang.experts or gang.config.device == "cuda":
        raise ResizeRefused("only a gloo gang with expert ranks changes its attention ranks while it runs")


def check_shrinkable(gang: Gang) -> None:
    """`ResizeRefused` unless the gang's last attention rank may leave (ask before draining it)."""
    _check_resizable(gang)
    if len(gang.attention) < 2:
        raise ResizeRefused("a gang keeps at least one attention rank")


def _regroup(gang: Gang, ranks: list, parking: list, timeout_s: float) -> float:
    """Every rank of `parking` ends its wave at one agreed step boundary; `ranks` (a rank more or less)
    join a new process group and wave again. Returns the pause: from asking to park to waving."""
    start = time.monotonic()
    parked = ray.get([r.park.remote(timeout_s) for r in parking], timeout=timeout_s + 10)
    if not all(parked):
        raise RuntimeError(f"ranks {[i for i, ok in enumerate(parked) if not ok]} did not park")
    address, port = ray.get(ranks[0].rendezvous_address.remote(), timeout=timeout_s)
    timeout = gang.config.collective_timeout_s
    ray.get([r.regroup.remote(address, port, len(ranks), timeout) for r in ranks], timeout=timeout_s)
    _start_waves(gang, timeout_s, ranks)
    pause = time.monotonic() - start
    gang.regroups += 1
    gang.last_regroup_pause_s, gang.last_regroup_ended = pause, start + pause
    log.warning("gang regrouped from %d to %d ranks in %.3fs", len(parking), len(ranks), pause)  # kept in the log
    return pause


def _remove_added_pg(gang: Gang, rank: int) -> None:
    pg = gang.added_pgs.pop(rank, None)
    if pg is not None:
        remove_pg(pg)


def remove_pg(pg: PlacementGroup) -> None:
    try:
        remove_placement_group(pg)
    except Exception:  # already gone
        pass


def recover_gang(gang: Gang, startup: GangStartup, timeout_s: float = 300, answer_s: float = 3.0,
                 hung: set[int] = frozenset()) -> Gang:
    """The failed gang again, keeping what survived: ranks that answer keep their loaded weights and
    rejoin a new process group; dead or hung ones (no answer within `answer_s`) are killed and
    replaced in their bundles, and only those read their share of the checkpoint. Raises when nothing
    can be kept (no expert ranks, NCCL, no survivor): the caller then builds the gang anew. `hung`:
    ranks the health check already found silent, replaced without asking again."""
    config = gang.config
    if not config.expert_workers or config.device == "cuda":
        raise RuntimeError("only a gloo gang with expert ranks is recovered in place")
    ranks = gang.ranks
    survived = _answering(ranks, answer_s, skip=hung)
    if not any(survived):
        raise RuntimeError("no rank survived")
    replaced = [rank for rank, ok in enumerate(survived) if not ok]
    if replaced and gang.placement is not None:  # a rebalance may have moved experts: replacements follow
        table = ray.get(ranks[survived.index(True)].placement_table.remote(), timeout=timeout_s)
        gang.placement = Placement(table)
    for rank in replaced:
        kill_actor(ranks[rank])
        ranks[rank] = _adopt_spare(gang, rank) or gang.start_rank(rank)
    E = config.expert_workers
    gang.experts, gang.attention = ranks[:E], ranks[E:]
    gang.changed()
    log.warning("recovering gang: %d of %d ranks survived, replacing %s", len(ranks) - len(replaced), len(ranks),
                replaced)
    startup.enter("placement")
    _wait_ranks_up(ranks, startup, timeout_s)
    startup.enter("process group")
    address, port = ray.get(ranks[0].rendezvous_address.remote(), timeout=timeout_s)
    joins = [(r.rejoin if ok else r.init_group).remote(address, port, config.collective_timeout_s)
             for r, ok in zip(ranks, survived)]
    ray.get(joins, timeout=timeout_s)
    startup.enter("weights")
    gang.loads = _load_weights([ranks[rank] for rank in replaced], startup, timeout_s) if replaced else []
    _start_waves(gang, timeout_s)
    return gang


def _adopt_spare(gang: Gang, rank: int):
    """A warm spare of the rank's role in place of failed rank `rank`, or None. The spare keeps its
    bundle (now the rank's home); the next spare takes the bundle the failed rank leaves (`cluster.spares`)."""
    role = role_of(gang, rank)
    while spare := next((s for s in gang.spares if s.role == role), None):
        gang.spares.remove(spare)
        try:
            ray.get(spare.actor.adopt.remote(rank, len(gang.attention), gang.placement), timeout=30)
        except Exception as exc:  # a spare that died meanwhile: the next one, or a new process
            log.warning("spare for %s rank %d unusable: %s", role, rank, exc)
            kill_actor(spare.actor)
            gang.vacated.append((role, spare.pg, spare.index))  # the next spare starts there
            continue
        gang.vacated.append((role, *gang.home(rank)))
        gang.homes[rank] = (spare.pg, spare.index)
        gang.spares_adopted += 1
        log.warning("%s rank %d replaced by a warm spare", role, rank)
        return spare.actor
    return None


def role_of(gang: Gang, rank: int) -> str:
    return "expert" if rank < gang.config.expert_workers else "attention"


def _answering(ranks: list, answer_s: float, skip: set[int]) -> list[bool]:
    """Which rank actors (but those in `skip`) are alive and responsive: a failed wave still counts (it
    is reset), a dead actor or one that does not answer in time (a hang) does not."""
    refs = {rank: r.wave_state.remote() for rank, r in enumerate(ranks) if rank not in skip}
    done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=answer_s)
    return [rank in refs and refs[rank] in done and _answered(refs[rank]) for rank in range(len(ranks))]


def _answered(ref) -> bool:
    try:
        ray.get(ref)
        return True
    except Exception:  # the actor died
        return False


def kill_actor(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass


def _wait_ranks_up(ranks: list, startup: GangStartup, timeout_s: float) -> None:
    """Until every rank actor has been constructed (a new worker process imports torch first)."""
    deadline = time.monotonic() + timeout_s
    pending = [r.load_progress.remote() for r in ranks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise GetTimeoutError(f"{len(pending)} of {len(ranks)} ranks not up after {timeout_s:g}s")
        ray.get(done)  # a rank whose constructor failed raises here
        startup.set_ranks_up(len(ranks) - len(pending))


def _load_weights(ranks: list, startup: GangStartup, timeout_s: float) -> list[dict]:
    """Every rank loads at once; meanwhile their byte counts are polled (each rank loads on a thread of
    its own, so `load_progress` answers while `load` runs)."""
    deadline = time.monotonic() + timeout_s
    loads = [r.load.remote() for r in ranks]
    pending = loads
    while True:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=LOAD_POLL_S)
        ray.get(done)  # a rank that failed raises now, not after the others finish
        startup.set_rank_bytes(ray.get([r.load_progress.remote() for r in ranks], timeout=timeout_s))
        if not pending:
            return ray.get(loads)
        if time.monotonic() > deadline:
            raise GetTimeoutError(f"{len(pending)} of {len(ranks)} ranks still loading after {timeout_s:g}s")


def destroy_gang(gang: Gang, me=None) -> PlacementGroup | None:
    """Every actor and placement group of the gang gone. `me`: the calling rank's own handle (an
    orphaned rank removing its gang): it is spared, and so is the group it runs in, returned for the
    caller to remove last (that ends its process)."""
    with gang.lock:  # a spare starting now sees it and goes (`cluster.spares.keep_spares`)
        gang.destroyed = True
        spares, gang.spares = gang.spares, []
        spare_pgs, gang.spare_pgs = gang.spare_pgs, []
    homes = [gang.home(rank)[0] for rank in range(len(gang.ranks))] + [spare.pg for spare in spares]
    mine = None
    for actor, home in zip(gang.ranks + [spare.actor for spare in spares], homes):
        if me is not None and actor._actor_id == me._actor_id:
            mine = home
        else:
            kill_actor(actor)
    gang.attention, gang.experts = [], []
    groups = list(gang.added_pgs.values()) + spare_pgs + ([gang.pg] if gang.own_pg and gang.pg is not None else [])
    gang.added_pgs, gang.pg = {}, None if gang.own_pg else gang.pg
    for pg in groups:
        if mine is None or pg.id != mine.id:
            remove_pg(pg)
    return mine


def rank_bundles(config: GangConfig) -> list[dict]:
    """One placement-group bundle per rank, in rank order (expert ranks first)."""
    return ([bundle_of(config.experts)] * config.expert_workers +
            [bundle_of(config.attention)] * config.attention_workers)


def bundle_of(resources) -> dict:
    bundle = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        bundle["GPU"] = resources.num_gpus
    return bundle


def _resources(resources) -> dict:
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}


def _in(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
