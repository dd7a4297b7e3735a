"""Starting Ray in a test module on a loaded 2-core CI machine.

Ray gives its raylet a fixed 30 s to register with the GCS; once in a clean-clone CI run a module's
`ray.init` ran past it ("The current node timed out during startup"). A failed start leaves its
daemons (GCS, raylet, ...) running as children of the test process: they are killed before the next
try."""

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
