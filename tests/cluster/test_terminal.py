"""Start-up progress without Ray: the stage tracker, the board's ordering, and the terminal lines."""

import io

import pytest

from cluster.startup import STAGES, GangStartup, StartupBoard, StartupSnapshot
from cluster.terminal import (PLAIN_EVERY_S, StartupDisplay, StepLine, format_startup, format_step,
                              worth_printing)


def snapshot(stage="weights", loaded=3_100_000_000, total=6_200_000_000, rate=410e6, up=3, gang="gang-0",
             application="maverick", seconds=12.0, order=(0.0, 0)):
    history = STAGES[:STAGES.index(stage) + 1]
    return StartupSnapshot(application, gang, stage, history, up, 3, loaded, total, rate, seconds, order)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_format_startup_weights_line():
    assert format_startup(snapshot()) == ("gang 0  weights        [#####.....] 3.1/6.2 GB  410 MB/s  ranks 3/3  12s")


def test_format_startup_before_the_totals_are_known_and_small_units():
    assert format_startup(snapshot("placement", 0, 0, 0.0, up=1, seconds=2.4)) == (
        "gang 0  placement      ranks 1/3  2s")
    line = format_startup(snapshot("ready", 6_300_000, 6_300_000, 2.5e6, gang="gang-1"))
    assert line.startswith("gang 1  ready          [##########] 6.3/6.3 MB  2 MB/s  ranks 3/3")
    assert format_startup(snapshot(application="twin"), with_application=True).startswith("twin gang 0  weights")


def test_worth_printing_on_stage_change_each_tenth_or_after_a_while():
    first = snapshot(loaded=610, total=1000)
    assert worth_printing(None, first, 0.0)
    assert not worth_printing(first, snapshot(loaded=690, total=1000), 1.0)  # the same tenth
    assert worth_printing(first, snapshot(loaded=700, total=1000), 1.0)
    assert worth_printing(first, snapshot("warm-up", 1000, 1000), 0.1)
    assert worth_printing(first, snapshot(loaded=610, total=1000), PLAIN_EVERY_S)


def test_plain_display_prints_lines_only_when_worth_it():
    out = io.StringIO()
    display = StartupDisplay(out)
    assert not display.tty
    polls = [[("placement", 0)], [("placement", 0)],
             [("placement", 0), ("process group", 0), ("weights", 50)],  # two stages passed between polls
             [("placement", 0), ("process group", 0), ("weights", 60)],
             [("placement", 0), ("process group", 0), ("weights", 520)],
             [("placement", 0), ("process group", 0), ("weights", 1000), ("warm-up", 1000), ("ready", 1000)]]
    for n, poll in enumerate(polls):
        display.update([[snapshot(stage, loaded, 1000 if loaded else 0, order=(0.0, n * 10 + i))
                         for i, (stage, loaded) in enumerate(poll)]])
    display.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["placement", "process", "weights", "weights", "warm-up", "ready"]
    assert "[#####.....] 0.5/1.0 kB" in lines[3]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_tty_display_redraws_every_gang_in_place():
    out = FakeTTY()
    display = StartupDisplay(out)
    display.update([[snapshot(gang="gang-0")], [snapshot(gang="gang-1")]])
    display.update([[snapshot(gang="gang-0"), snapshot("ready", gang="gang-0")], [snapshot(gang="gang-1")]])
    display.close()
    text = out.getvalue()
    first, second = text.split("\r")[1:]
    assert first.count("\n") == 1 and "gang 0  weights" in first and "gang 1  weights" in first
    assert second.startswith("\x1b[1A") and "gang 0  ready" in second  # back up one line, then overwrite
    assert text.endswith("\n")


def test_stages_go_forward_once_each_and_are_logged_once(caplog):
    pushed = []
    startup = GangStartup("gang-0", 2, publish=pushed.append)
    with caplog.at_level("INFO", logger="cluster.startup"):
        for stage in STAGES[:3]:
            startup.enter(stage)
            startup.enter(stage)
    assert startup.history == list(STAGES[:3])
    assert [r.getMessage().split(":")[1].split("(")[0].strip() for r in caplog.records] == list(STAGES[:3])
    with pytest.raises(AssertionError):
        startup.enter("placement")
    startup.set_rank_bytes([{"rank": 0, "loaded_bytes": 10, "total_bytes": 100},
                            {"rank": 1, "loaded_bytes": 0, "total_bytes": 0}])
    assert startup.snapshot().total_bytes == 0  # rank 1 has not planned its reads yet
    startup.set_rank_bytes([{"rank": 1, "loaded_bytes": 5, "total_bytes": 50}])
    s = startup.snapshot()
    assert (s.loaded_bytes, s.total_bytes, s.stage) == (15, 150, "weights")
    assert [p.stage for p in pushed][:3] == list(STAGES[:3]) and pushed[-1].loaded_bytes == 15
    assert [p.order for p in pushed] == sorted(p.order for p in pushed)


def test_board_keeps_each_stages_latest_snapshot_per_gang():
    board = StartupBoard()
    board.publish(snapshot("placement", order=(1.0, 0)))
    board.publish(snapshot("weights", loaded=10, order=(1.0, 5)))
    board.publish(snapshot("weights", loaded=5, order=(1.0, 3)))  # arrived late: ignored
    board.publish(snapshot("placement", gang="gang-1", order=(1.0, 0)))
    gang0, gang1 = board.snapshots()
    assert [(s.stage, s.loaded_bytes) for s in gang0] == [("placement", 3_100_000_000), ("weights", 10)]
    assert [s.gang for s in gang1] == ["gang-1"]
    board.publish(snapshot("placement", order=(2.0, 0)))  # a rebuild of gang-0 starts over
    board.publish(snapshot("ready", order=(1.0, 9)))  # the old build, too late
    assert [(s.stage, s.order) for s in board.snapshots()[0]] == [("placement", (2.0, 0))]


def test_step_lines_plain_and_in_place():
    step = format_step("engine", "ours", 8, 2, 3, 1, 3)
    assert step == "bench engine  ours  concurrency 8 (level 2/3)  round 1/3"
    plain = io.StringIO()
    line = StepLine(plain)
    line.show(step)
    line.print("result")
    line.show("next")
    line.close()
    assert plain.getvalue() == f"{step}\nresult\nnext\n"
    tty = FakeTTY()
    line = StepLine(tty)
    line.show("a")
    line.show("b")
    line.print("kept")
    line.show("c")
    line.close()
    assert tty.getvalue() == "\ra\x1b[K\rb\x1b[K\rkept\x1b[K\n\rc\x1b[K\n"
