"""Load progress: the loader knows a rank's bytes before its first read and counts them as it copies,
and a rank answers `load_progress` while it loads (the load runs off the actor's event loop)."""

import asyncio
import threading

import pytest
import torch

from model.checkpoint import CheckpointReader
from model.config import load_config
from model.loader import LoadProgress, expert_slice_names, load_model
from model.moe import ExpertSlices
from model.tiny import make_tiny
from workers.attention_worker import AttentionWorker
from workers.config import EngineConfig
from workers.expert_worker import ExpertWorker
from workers.rank import Rank


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny-maverick", seed=3)


class RecordingProgress(LoadProgress):
    """Records what the reader had read when each advance came."""

    def __init__(self, reader: CheckpointReader):
        super().__init__()
        self.reader, self.seen = reader, []

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self.seen.append((self.total_bytes, self.loaded_bytes, self.reader.bytes_read))


def test_total_is_known_before_the_first_read_and_every_byte_is_counted(tiny):
    config = load_config(tiny)
    shard = ExpertSlices(config, {layer: [1, 2, 5] for layer in config.moe_layers})
    with CheckpointReader(tiny) as reader:
        progress = RecordingProgress(reader)
        report = load_model(shard, reader, torch.float32, strict=False, progress=progress, names=expert_slice_names)
    assert progress.total_bytes == progress.loaded_bytes == report.bytes_read > 0
    totals = {total for total, _, _ in progress.seen}
    assert totals == {report.bytes_read}  # the total was set once, before any advance
    assert len(progress.seen) == 2 * len(config.moe_layers)  # gate_up and down per MoE layer
    # counted as copied: after each parameter, what was counted is exactly what was read so far
    assert all(loaded == read for _, loaded, read in progress.seen)


class GateProgress(LoadProgress):
    """Holds the loading thread after its first parameter until the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        assert self.gate.wait(60), "the test never opened the gate"


def test_a_loading_rank_answers_load_progress_meanwhile(tiny):
    """As in a Ray actor with an async method: every call runs on one event loop, and `load` must
    leave it free while the weights are read."""
    worker = AttentionWorker(0, 1, 0, str(tiny), EngineConfig(kv_cache_memory=4 * 2**20), skip_tokenizer_init=True)
    worker.progress = gate = GateProgress()
    assert worker.load_progress() == {"rank": 0, "loaded_bytes": 0, "total_bytes": 0}

    async def main():
        loading = asyncio.create_task(worker.load())
        for _ in range(600):  # the loop stays free: this coroutine keeps running while the load waits
            state = worker.load_progress()
            if state["loaded_bytes"]:
                break
            await asyncio.sleep(0.1)
        assert not loading.done()
        gate.gate.set()
        return state, await asyncio.wait_for(loading, 120)

    during, report = asyncio.run(main())
    assert 0 < during["loaded_bytes"] < during["total_bytes"] == report["bytes_read"]
    assert worker.load_progress() == {"rank": 0, "loaded_bytes": report["bytes_read"],
                                      "total_bytes": report["bytes_read"]}


def test_ranks_are_async_actors():
    """Ray gives an actor concurrency only if one of its methods is a coroutine function."""
    assert asyncio.iscoroutinefunction(Rank.load)
    assert asyncio.iscoroutinefunction(ExpertWorker.load) and asyncio.iscoroutinefunction(AttentionWorker.load)
