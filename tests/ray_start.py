"""Starting Ray in a test module on a loaded 2-core CI machine.

Ray gives its raylet a fixed 30 s to register with the GCS; once in a clean-clone CI run a module's
`ray.init` ran past it ("The current node timed out during startup") while the previous module had
just shut its Ray down. A failed start leaves its GCS and raylet running as children of the test
process, so they are killed before the next try."""

import time

import psutil

STARTUP_TIMEOUT = "timed out during startup"
RAY_DAEMONS = ("gcs_server", "raylet", "haproxy")
ATTEMPTS = 3


def start(create):
    """`create()` (a `ray.init(...)` or a `Cluster(...)`), tried again after a startup timeout."""
    for attempt in range(1, ATTEMPTS + 1):
        wait_for_stale_daemons()
        try:
            return create()
        except Exception as error:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(error) or attempt == ATTEMPTS:
                raise
            print(f"ray_start: attempt {attempt} timed out during startup; killing its daemons, trying again")
            import ray

            ray.shutdown()
            kill_children()


def wait_for_stale_daemons(timeout_s: float = 60) -> None:
    """Let a Ray that a previous module shut down finish exiting before a new one competes with it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _daemons_running():
        time.sleep(0.5)


def kill_children() -> None:
    children = psutil.Process().children(recursive=True)
    for process in children:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def _daemons_running() -> bool:
    for process in psutil.process_iter(["name"]):
        if any(daemon in (process.info["name"] or "") for daemon in RAY_DAEMONS):
            return True
    return False
