"""An ingress's view of a gang Serve stopped (`cluster.gang_pool`): while this ingress still has streams
on it, it is leaving (draining, with its load), and it is said to have left once its last stream ends;
a gang without streams leaves at once."""

from cluster.gang_pool import GangPool, _Gang


def pool_with(name: str, load: int) -> tuple[GangPool, _Gang]:
    pool = GangPool(handle=None, consumer="ingress-test")
    g = pool.gangs[name] = _Gang({"gang": name, "state": "ready", "ready": True, "epoch": 1})
    g.ready, g.load = True, load
    return pool, g


def test_a_stopped_gang_with_streams_is_leaving_until_its_last_stream_ends():
    pool, g = pool_with("gang-a", load=2)
    pool._forget("gang-a")
    assert pool.gangs == {} and pool.left == [] and pool.leaving == {"gang-a": 2} and not g.ready
    pool._stream_ended("gang-a", g)
    assert pool.left == [] and pool.leaving == {"gang-a": 1}
    pool._stream_ended("gang-a", g)
    assert pool.left == ["gang-a"] and pool.leaving == {}


def test_a_stopped_gang_without_streams_leaves_at_once():
    pool, _ = pool_with("gang-b", load=0)
    pool._forget("gang-b")
    assert pool.left == ["gang-b"] and pool.leaving == {}


def test_the_ingress_metrics_say_leaving_gangs_draining_and_gone_ones_stopped():
    from router.metrics import RequestMetrics

    metrics = RequestMetrics("tiny", True)
    metrics.gangs({}, left=["gang-x"], leaving={"gang-a": 1})
    on = {line.split(" ")[0] for line in metrics.render().decode().splitlines()
          if line.startswith(("maverick_gang_state{", "maverick_gang_requests_in_flight{")) and line.endswith(" 1.0")}
    assert on == {'maverick_gang_state{gang="gang-x",model_name="tiny",state="stopped"}',
                  'maverick_gang_state{gang="gang-a",model_name="tiny",state="draining"}',
                  'maverick_gang_requests_in_flight{gang="gang-a",model_name="tiny"}'}, on


class _Client:
    """The pool's side of a `GangClient`: its epoch, and what closed it."""

    def __init__(self, epoch: int):
        self.epoch, self.broken, self.closed = epoch, False, None

    def close(self, reason: str) -> None:
        self.closed = reason


def test_a_gang_its_supervisor_found_failed_ends_this_ingress_streams_at_once():
    """A hang is declared by the supervisor while the workers' collectives still wait: the status that
    says so (same epoch, state failed) ends the client's streams, so they resume without waiting for the
    collective timeout; the same epoch is not used again."""
    pool, g = pool_with("gang-c", load=1)
    g.client = client = _Client(epoch=1)
    pool._update("gang-c", {"gang": "gang-c", "state": "ready", "ready": True, "epoch": 1})
    assert client.closed is None and g.client is client
    pool._update("gang-c", {"gang": "gang-c", "state": "failed", "ready": False, "epoch": 1,
                            "failure": "the step watchdog: ranks [0] did not answer"})
    assert client.closed == "the gang failed: the step watchdog: ranks [0] did not answer"
    assert g.client is None and g.failed_epoch == 1 and not g.ready
    pool._update("gang-c", {"gang": "gang-c", "state": "ready", "ready": True, "epoch": 2})
    assert g.ready


def test_a_gang_whose_replica_died_serves_on_until_its_channel_breaks():
    """Its ranks outlive the replica: a status read without it changes nothing while this consumer's
    channel to it holds; the replica Serve starts in its place reports the same epoch; a gang whose
    channel broke (its ranks gone too) leaves."""
    pool, g = pool_with("gang-d", load=1)
    g.client = client = _Client(epoch=1)
    pool._unseen("gang-d", everyone_answered=True)
    assert pool.gangs["gang-d"] is g and g.ready and g.without_replica and client.closed is None
    pool._update("gang-d", {"gang": "gang-d", "state": "ready", "ready": True, "epoch": 1})
    assert g.client is client and g.ready and not g.without_replica
    client.broken = True
    pool._unseen("gang-d", everyone_answered=True)
    assert "gang-d" not in pool.gangs and pool.leaving == {"gang-d": 1}


def test_a_gang_never_streamed_from_here_leaves_with_its_replica():
    pool, g = pool_with("gang-e", load=0)
    pool._unseen("gang-e", everyone_answered=True)
    assert pool.gangs == {} and pool.left == ["gang-e"]


def test_requests_waiting_for_a_gang_share_status_reads_until_one_shows_it_ready():
    """A retry waits for a ready gang (its own gang failed): it reads the statuses itself, at most every
    `WAITING_STATUS_PERIOD_S`, instead of waiting for the 1 s watcher; every waiter shares each read."""
    import asyncio

    class Pool(GangPool):
        reads = 0

        async def refresh_all(self) -> bool:
            self.reads += 1
            await asyncio.sleep(0)
            if self.reads == 3:  # the third read sees the recovered gang
                self._update("gang-d", {"gang": "gang-d", "state": "ready", "ready": True, "epoch": 2})
            return self.reads >= 3

    async def main():
        pool = Pool(handle=None, consumer="ingress-test")
        pool.gangs["gang-d"] = _Gang({"gang": "gang-d", "state": "rebuilding", "ready": False, "epoch": 1})
        picked = await asyncio.wait_for(asyncio.gather(*(pool._wait_for_gang(None) for _ in range(5))), 30)
        return picked, pool.reads

    picked, reads = asyncio.run(main())
    assert picked == ["gang-d"] * 5 and reads == 3, (picked, reads)
