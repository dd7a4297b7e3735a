"""Progress on a terminal: one line per starting gang (`maverick serve`), one per benchmark step.

`format_startup` and `format_step` are pure. On a TTY, `StartupDisplay` redraws its lines in place
(carriage return, cursor up) and `StepLine` overwrites one line; elsewhere (a log file, a pipe,
journald) both print plain lines, and a gang's line is printed only when its stage changes, its
bytes pass another tenth of the total, or `PLAIN_EVERY_S` have gone by.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from cluster.startup import STAGES, StartupSnapshot

BAR_WIDTH = 10
PLAIN_EVERY_S = 10.0
_STAGE_WIDTH = max(len(s) for s in STAGES)
_UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def _unit(nbytes: float) -> tuple[float, str]:
    return next(((scale, name) for scale, name in _UNITS if nbytes >= scale), (1.0, "B"))


def format_bytes(loaded: int, total: int) -> str:
    """`3.1/6.2 GB`: both in the total's unit."""
    scale, name = _unit(total)
    return f"{loaded / scale:.1f}/{total / scale:.1f} {name}"


def format_rate(bytes_per_s: float) -> str:
    scale, name = _unit(bytes_per_s)
    return f"{bytes_per_s / scale:.0f} {name}/s"


def gang_label(snapshot: StartupSnapshot, with_application: bool = False) -> str:
    """`gang 0` (the deployment `gang-0`); `app gang 0` when several applications start at once."""
    label = snapshot.gang.replace("-", " ")
    return f"{snapshot.application} {label}" if with_application else label


def format_startup(snapshot: StartupSnapshot, with_application: bool = False) -> str:
    """`gang 0  weights        [#####.....] 3.1/6.2 GB  410 MB/s  ranks 3/3  12s`."""
    s = snapshot
    parts = [gang_label(s, with_application), s.stage.ljust(_STAGE_WIDTH)]
    if s.total_bytes:  # known once every rank has planned its reads
        filled = min(BAR_WIDTH, BAR_WIDTH * s.loaded_bytes // s.total_bytes)
        parts.append(f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {format_bytes(s.loaded_bytes, s.total_bytes)}")
        parts.append(format_rate(s.bytes_per_s))
    parts.append(f"ranks {s.ranks_up}/{s.num_ranks}")
    parts.append(f"{s.seconds:.0f}s")
    return "  ".join(parts)


def tenth(snapshot: StartupSnapshot) -> int:
    """Which tenth of its bytes a gang has loaded (0..10)."""
    return 10 * snapshot.loaded_bytes // snapshot.total_bytes if snapshot.total_bytes else 0


def worth_printing(last: StartupSnapshot | None, now: StartupSnapshot, seconds_since_last: float) -> bool:
    """For plain output: a new stage, another tenth of the bytes, or a while since the last line."""
    return (last is None or now.stage != last.stage or tenth(now) > tenth(last)
            or seconds_since_last >= PLAIN_EVERY_S)


class StartupDisplay:
    """The live lines of every starting gang, on `stream` (stderr: stdout keeps the endpoints)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._drawn = 0  # lines drawn in place last time (TTY)
        # plain output, per gang build: the stages printed, and the last line printed and when
        self._printed: dict[tuple, tuple[set[str], StartupSnapshot, float]] = {}

    def update(self, gangs: list[list[StartupSnapshot]]) -> None:
        """`gangs`: per gang, the latest snapshot of each stage entered so far (`StartupBoard.snapshots`)."""
        gangs = [stages for stages in gangs if stages]
        with_application = len({stages[-1].application for stages in gangs}) > 1
        if self.tty:
            self._redraw([format_startup(stages[-1], with_application) for stages in gangs])
            return
        now = time.monotonic()
        for stages in gangs:
            key = (stages[-1].application, stages[-1].gang, stages[-1].order[0])
            seen, last, at = self._printed.get(key, (set(), None, now))
            for s in stages:  # every stage gets its line, even one that began and ended between two polls
                if s.stage not in seen:
                    self._write(s, with_application)
                    seen.add(s.stage)
                    last, at = s, now
            current = stages[-1]
            if current != last and worth_printing(last, current, now - at):
                self._write(current, with_application)
                last, at = current, now
            self._printed[key] = (seen, last, at)
        self.stream.flush()

    def _write(self, snapshot: StartupSnapshot, with_application: bool) -> None:
        self.stream.write(format_startup(snapshot, with_application) + "\n")

    def _redraw(self, lines: list[str]) -> None:
        if not lines:
            return
        # back to the first of the lines drawn last time, then overwrite each (ESC[K clears the rest)
        up = f"\x1b[{self._drawn - 1}A" if self._drawn > 1 else ""
        self.stream.write("\r" + up + "\n".join(f"{line}\x1b[K" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        """Leave the cursor below the drawn lines (TTY)."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def format_step(target: str, system: str, concurrency: int, level: int, levels: int, round_: int,
                rounds: int) -> str:
    """`bench engine  ours  concurrency 8 (level 2/3)  round 1/3`; level and round count from 1."""
    return (f"bench {target}  {system}  concurrency {concurrency} (level {level}/{levels})  "
            f"round {round_}/{rounds}")


class StepLine:
    """What a benchmark is doing now: overwritten in place on a TTY, one plain line per step elsewhere."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._open = False  # a TTY line without its newline yet

    def show(self, text: str) -> None:
        """The current step: replaced by the next one."""
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def print(self, text: str) -> None:
        """A line that stays (a result)."""
        self.stream.write((f"\r{text}\x1b[K\n" if self._open else text + "\n"))
        self._open = False
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
