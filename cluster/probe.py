"""Waiting for a state (a readiness probe answering 200, or any condition): the CLI, benchmarks, tests;
and keeping one fresh (`every`)."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.5) -> T:
    """Poll `condition` until it returns something truthy (returned); TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(poll_s)


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except Exception:  # refused, reset, 5xx: not ready
        return False


def wait_http_ok(url: str, timeout_s: float, alive: Callable[[], bool] | None = None, poll_s: float = 0.5) -> None:
    """Return once `url` answers 200; raise if `alive()` turns false or `timeout_s` passes first."""
    def ready() -> bool:
        if alive is not None and not alive():
            raise RuntimeError(f"the server behind {url} exited before it was ready")
        return http_ok(url)

    wait_until(ready, timeout_s, f"{url} to answer 200", poll_s)


async def every(period_s: float, round_fn: Callable[[], Awaitable[None]], what: str) -> None:
    """`await round_fn()` every `period_s` seconds until cancelled. A round that raises is logged (the
    first of a run of failures with its traceback) and the next one runs: a watcher never dies of one."""
    failing = False
    while True:
        try:
            await round_fn()
            if failing:
                log.warning("%s: works again", what)
            failing = False
        except Exception as exc:
            if not failing:
                log.exception("%s failed; trying again every %gs", what, period_s)
            else:
                log.debug("%s failed again: %r", what, exc)
            failing = True
        await asyncio.sleep(period_s)
