"""`cluster.probe.every`: the loop behind the ingress's gang status watcher never dies of one bad round."""

import asyncio
import logging


def test_a_round_that_raises_is_logged_once_and_the_rounds_go_on(caplog):
    from cluster.probe import every

    rounds = []

    async def round_() -> None:
        rounds.append(len(rounds))
        if len(rounds) in (2, 3):  # a run of two failures
            raise KeyError("restarts")
        if len(rounds) == 5:
            raise asyncio.CancelledError  # cancelling the task is the only way out

    async def main() -> None:
        try:
            await every(0, round_, "the watcher")
        except asyncio.CancelledError:
            pass

    with caplog.at_level(logging.DEBUG, logger="cluster.probe"):
        asyncio.run(main())
    assert rounds == [0, 1, 2, 3, 4]
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and "the watcher failed" in failed[0].getMessage() and failed[0].exc_info
    assert any("works again" in r.getMessage() for r in caplog.records)
