"""Waiting for an HTTP endpoint (a readiness probe) to answer 200: the CLI, benchmarks and tests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except Exception:  # refused, reset, 5xx: not ready
        return False


def wait_http_ok(url: str, timeout_s: float, alive: Callable[[], bool] | None = None, poll_s: float = 0.5) -> None:
    """Return once `url` answers 200; raise if `alive()` turns false or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server behind {url} exited before it was ready")
        if http_ok(url):
            return
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready within {timeout_s:g}s")
