"""Starting Ray in a test module on a loaded 2-core CI machine.

Ray gives its raylet a fixed 30 s to register with the GCS; once in a clean-clone CI run a module's
`ray.init` ran past it ("The current node timed out during startup"). A failed start leaves its
daemons (GCS, raylet, ...) running as children of the test process: they are killed before the next
try."""

import contextlib
import os

import psutil

STARTUP_TIMEOUT = "timed out during startup"
ATTEMPTS = 3


def start(create):
    """`create()` (a `ray.init(...)` or a `Cluster(...)`), tried again after a startup timeout."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return create()
        except Exception as error:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(error) or attempt == ATTEMPTS:
                raise
            print(f"ray_start: attempt {attempt} timed out during startup; killing its daemons, trying again")
            import ray

            ray.shutdown()
            _kill_ray_children()


def _kill_ray_children() -> None:
    """Only Ray's own processes (binaries and scripts in the `ray` package, workers renamed `ray::...`):
    a server another fixture started stays up."""
    daemons = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = process.cmdline()
            if command[:1] and command[0].startswith("ray::") or any("/ray/" in part for part in command):
                process.kill()
                daemons.append(process)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(daemons, timeout=30)


@contextlib.contextmanager
def auth_mode(mode: str):
    """`RAY_AUTH_MODE` set to `mode` inside, restored after, in the environment and in Ray's cached config.

    Ray keeps the mode in its C++ config, refreshed only when a new local cluster turns token auth on.
    Connecting with `disabled` leaves it there; once the environment says `token` again, the next
    local `ray.init` started a token GCS and then could not connect to it (InvalidAuthToken). In CI
    this broke every Ray module after the autoscaling test."""
    from ray._raylet import Config

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        Config.initialize("")

