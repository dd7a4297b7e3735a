"""What every rank of a gang does the same way: threads, rendezvous, the process group, the wave loop.

Actor classes (`AttentionWorker`, `ExpertWorker`) are plain classes here; `cluster/` wraps them with
`ray.remote` and the resources of its placement group.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.loader import LoadProgress
from workers.metrics import Exporter, RankMetrics
from workers.wave import WaveLoop

log = logging.getLogger(__name__)
IDLE_STALL_POLL_S = 1.0  # the stall long-poll's pace while no round is under way


@dataclass(frozen=True)
class MetricsOptions:
    gang: str  # the label that tells gangs apart (the Serve deployment's name)
    application: str = "maverick"  # the Serve application
    period_s: float = 1.0
    expert_layer_matrix: bool = False  # tokens per (layer, expert): Maverick has 24 x 128 per gang


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests of one process)
        return "127.0.0.1"


def interface_of(ip: str) -> str | None:
    """The network interface that holds `ip`."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addresses):
            return name
    return None


def gloo_group(address: str, port: int, rank: int, world_size: int,
               timeout: datetime.timedelta) -> tuple[dist.ProcessGroup, dist.TCPStore]:
    """A gloo group of its own, outside torch's global registry (not the default group), so a rank can
    leave a broken one and form the next while a thread may still be blocked in the old one. Rank 0
    hosts the rendezvous store at `address:port`."""
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
    backend = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    # NOTE: what torch's own group helper does; the functional collectives take such a group
    group = dist.ProcessGroup(store, rank, world_size)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return group, store


class Rank:
    def __init__(self, rank: int, world_size: int, torch_threads: int, device: str = "cpu",
                 metrics: MetricsOptions | None = None):
        self.rank, self.world_size = rank, world_size
        self.metrics_options = metrics
        self._exporter: Exporter | None = None
        self.device = torch.device(device)
        # NOTE: one Ray actor per rank; its intra-op threads are the cores it may use, and they
        # belong to the wave thread, which runs every step. libgomp gives the thread that first
        # forks a team the fast pool: a second thread forking later measured as slow as one
        # thread. So this thread and the loading thread stay single-threaded; `WaveLoop` takes them.
        self.torch_threads = torch_threads
        torch.set_num_threads(1)
        self.group: dist.ProcessGroup | None = None
        self._store: dist.TCPStore | None = None
        self.wave: WaveLoop | None = None
        self.progress = LoadProgress()
        self._lease_until: float | None = None  # a detached rank's: see `lease`
        self._lease_grace_s = 0.0

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port, for every rank's `init_process_group`."""
        return node_ip(), free_port()

    def init_group(self, address: str, port: int, timeout_s: float) -> float:
        """Join the gang's process group; blocks until every rank has joined (call all at once)."""
        start = time.monotonic()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo advertises the address its host name resolves to, often 127.0.1.1 (Debian's
            # /etc/hosts): ranks on other hosts could not connect. Bind it to the interface that
            # carries this node's Ray address instead, the one the other hosts already reach.
            interface = interface_of(node_ip())
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
        if self.device.type == "cuda":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            torch.cuda.set_device(0)  # one GPU per actor: Ray shows it as device 0
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timeout)
            self.group = dist.group.WORLD
        else:
            # the store is kept: on rank 0 it is the rendezvous server, which must outlive the rendezvous
            self.group, self._store = gloo_group(address, port, self.rank, self.world_size, timeout)
        return time.monotonic() - start

    def rejoin(self, address: str, port: int, timeout_s: float) -> float:
        """After the gang failed, on a rank that survived: leave the broken group for a new one and get
        ready to start again, keeping the loaded weights. A wave thread still blocked in the old group
        ends at its collective timeout and touches nothing of the new epoch. NCCL ranks are replaced."""
        if self.device.type == "cuda":
            raise RuntimeError("a rank on NCCL is replaced after a failure, not rejoined")
        if self.wave is not None:
            self.wave.stop()
        took = self.init_group(address, port, timeout_s)
        self.reset()
        return took

    def reset(self) -> None:
        """A fresh wave (and engine state) on the new group; the weights stay."""
        raise NotImplementedError

    async def park(self, timeout_s: float) -> bool:
        """Leave the wave at the next round the whole gang agrees on, before a regroup (`WaveLoop.park`);
        True once this rank's loop has ended there."""
        wave = self.wave
        wave.park()
        await asyncio.to_thread(wave.thread.join, timeout_s)
        return wave.parked

    async def regroup(self, address: str, port: int, world_size: int, timeout_s: float) -> float:
        """Attention ranks joined or left at the end of the group: this rank, parked (or new and loaded),
        joins the gang's next group of `world_size` ranks with all it holds: its weights, and on an
        attention rank the engine with its requests and KV cache. `start` then runs its new wave."""
        if self.device.type == "cuda":
            raise RuntimeError("a gang on NCCL does not regroup (its ranks are rebuilt)")
        if self.wave is not None and self.wave.thread.is_alive():
            raise RuntimeError(f"rank {self.rank} must park before it regroups")
        self.world_size = world_size
        took = await asyncio.to_thread(self.init_group, address, port, timeout_s)  # the actor keeps answering
        self.resume_on_group()
        return took

    def resume_on_group(self) -> None:
        """After a regroup: a new wave on the new group over everything this rank holds."""
        raise NotImplementedError

    async def load(self) -> dict:
        """Load this rank's weights on a thread of their own. Ray runs every method of an actor with an
        async method on its event loop: loading there would block `load_progress` until the end."""
        return await asyncio.to_thread(self._load_single_threaded)

    def _load_single_threaded(self) -> dict:
        torch.set_num_threads(1)  # a loading thread never forks the OpenMP team (see __init__)
        return self.load_weights()

    def load_weights(self) -> dict:
        """Read this rank's share of the checkpoint into its modules, counting into `self.progress`."""
        raise NotImplementedError

    def load_progress(self) -> dict:
        """Bytes of this rank's weights copied so far, of the total it will read (0 of 0 before loading)."""
        return {"rank": self.rank, "loaded_bytes": self.progress.loaded_bytes,
                "total_bytes": self.progress.total_bytes}

    def start_metrics(self, role: str) -> None:
        """Export this rank's metrics from a thread of their own (never the wave thread)."""
        options = self.metrics_options
        if options is None or self._exporter is not None:
            return
        labels = {"application": options.application, "gang": options.gang, "rank": str(self.rank), "role": role}
        metrics = RankMetrics(labels, options.expert_layer_matrix)
        self._exporter = Exporter(lambda: self.publish_metrics(metrics), options.period_s, f"{role}-{self.rank}")
        self._exporter.start()

    def publish_metrics(self, metrics: RankMetrics) -> None:
        wave = self.wave
        if wave is not None:
            comm = getattr(self, "comm", None)
            metrics.comm(comm.alltoall_seconds if comm else 0.0, comm.alltoall_bytes if comm else 0,
                         wave.idle_seconds)

    def wake(self, generation: int) -> None:
        if self.wave is not None:
            self.wave.wake(generation)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used (all threads): idle ranks must not burn a core."""
        return time.process_time()

    def placement_table(self) -> dict[int, list[list[int]]] | None:
        """The (MoE layer, expert) -> ranks table this rank follows now (a rebalance may have changed it)."""
        placement = getattr(self, "placement", None)
        return placement.table if placement is not None else None

    async def wait_stall(self, timeout_s: float) -> dict | None:
        """The step watchdog's long-poll: returns when this rank's wave has been in one round past its
        deadline (a peer has not met it there), or None after `timeout_s`. Off the wave thread: a hung
        peer blocks that one inside a collective. Wakes once per deadline while busy, once a second idle."""
        end = time.monotonic() + timeout_s
        while (now := time.monotonic()) < end:
            wave = self.wave
            stalled = wave.stalled() if wave is not None else None
            if stalled is not None:
                round_no, in_round = stalled
                return {"rank": self.rank, "round": round_no, "stalled_s": in_round,
                        "deadline_s": wave.stall_deadline_s()}
            # a failed wave's last round stays stamped: it is not waiting on a peer, so poll at the idle pace
            started = wave.round_started if wave is not None and wave.failed is None else None
            wait = started + wave.stall_deadline_s() - now if started is not None else IDLE_STALL_POLL_S
            await asyncio.sleep(max(0.05, min(wait, end - now)))
        return None

    def lease(self, first_s: float, grace_s: float, on_orphaned) -> None:
        """A detached rank (one that outlives the replica supervising its gang) watches its lease: once
        no `renew_lease` came for `grace_s` (`first_s` at first), it calls `on_orphaned()`, which removes
        the gang and returns True when the supervisor is really gone (then this process ends)."""
        self._lease_grace_s = grace_s
        self._lease_until = time.monotonic() + first_s
        threading.Thread(target=self._watch_lease, args=(on_orphaned,), daemon=True, name="lease").start()

    def renew_lease(self) -> None:
        if self._lease_until is not None:
            self._lease_until = time.monotonic() + self._lease_grace_s

    def _watch_lease(self, on_orphaned) -> None:
        while True:
            time.sleep(max(0.2, min(5.0, self._lease_grace_s / 4)))
            if time.monotonic() < self._lease_until:
                continue
            try:
                orphaned = on_orphaned()
            except Exception:
                log.exception("rank %d: removing its orphaned gang failed", self.rank)
                orphaned = False  # asked again after another grace
            if orphaned:
                log.error("rank %d: no supervisor renewed its lease for %.0fs: it leaves", self.rank,
                          self._lease_grace_s)
                os._exit(0)
            self._lease_until = time.monotonic() + self._lease_grace_s  # the supervisor lives: late renewals

    def wave_state(self) -> dict:
        wave = self.wave
        return {"rank": self.rank, "pid": os.getpid(), "steps": wave.num_steps if wave else 0,
                "idle": bool(wave and wave.idle),
                "failed": repr(wave.failed) if wave and wave.failed else None,
                "stall_deadline_s": wave.stall_deadline_s() if wave else None}

    def shutdown(self) -> None:
        if self._exporter is not None:
            self._exporter.stop()
        if self.wave is not None:
            self.wave.stop()
        if dist.is_initialized():  # NCCL: the default group
            try:
                dist.destroy_process_group()
            except Exception:  # the group may already be broken by a dead peer
                pass
        self.group = None
