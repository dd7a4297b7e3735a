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
