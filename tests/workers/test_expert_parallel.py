"""Dispatch/combine over real gloo process groups, against the local reference path."""

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.moe import RoutedExperts
from workers.expert_parallel import AllToAllExperts, ExpertGroup, Placement, serve_layer
from workers.expert_placement import place_experts, to_rank_table

D, F, E = 16, 24, 8


def _reference_experts(expert_ids=None):
    torch.manual_seed(0)
    experts = RoutedExperts(D, F, list(range(E)), E)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    if expert_ids is None:
        return experts
    part = RoutedExperts(D, F, expert_ids, E)
    part.gate_up_proj.data = experts.gate_up_proj.data[expert_ids]
    part.down_proj.data = experts.down_proj.data[expert_ids]
    return part


def _inputs(attention_rank, case, step):
    g = torch.Generator().manual_seed(100 + attention_rank + 10 * step)
    n = {"random": 23, "one_expert": 9, "zero_on_rank1": 0 if attention_rank == 1 else 12, "empty": 0}[case]
    if n:  # a second step with other batch sizes: rank 0's grows (the capacity must too), rank 1's shrinks
        n += step * (9 if attention_rank == 0 else -7)
    x = torch.randn(n, D, generator=g)
    ids = torch.full((n,), 5) if case == "one_expert" else torch.randint(0, E, (n,), generator=g)
    return x, ids


STEPS, LAYERS = 2, (0, 1)


def _agree(comm: ExpertGroup, rows: list[int]) -> int:
    """The wave's agreement (`workers/wave.py`) without the wave: MAX of every rank's [T, M]."""
    plan = torch.tensor([max(rows, default=0), len(rows)])
    dist.all_reduce(plan, op=dist.ReduceOp.MAX)
    return comm.agree(plan.tolist())


def _placement(num_experts, replicated):
    """Contiguous, or EPLB's: 2 spare slots per expert rank, expert 5 hot (copies on every expert rank)."""
    expert_ranks = list(range(num_experts))  # expert ranks first, as in a gang
    if not replicated:
        return Placement.contiguous(list(LAYERS), E, expert_ranks)
    load = [1] * E
    load[5] = 100
    capacities = [E // len(expert_ranks) + (i < E % len(expert_ranks)) + 2 for i in range(len(expert_ranks))]
    return Placement(to_rank_table(place_experts({layer: load for layer in LAYERS}, capacities)))


def _worker(rank, world, num_attention, case, store_path, results, sync_free=False, split=False, replicated=False):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        num_experts = world - num_attention
        comm = ExpertGroup(dist.group.WORLD, rank, world, num_experts, D, torch.float32)
        placement = _placement(num_experts, replicated)
        # steps of two MoE layers: count and capacity agreed once per step. With micro-batches, attention
        # rank 0 splits its rows in two (rank 1 does not ask to: it runs its rows and an empty one), and
        # both micro-batches are dispatched before either is combined, as the overlapped forward does
        for step in range(STEPS):
            if rank >= num_experts:
                x, ids = _inputs(rank - num_experts, case, step)
                first = rank == num_experts
                parts = [(0, len(x) // 2), (len(x) // 2, len(x))] if split and first else [(0, len(x))]
                count = _agree(comm, [b - a for a, b in parts])
                parts += [(len(x), len(x))] * (count - len(parts))
                for layer in LAYERS:
                    a2a = AllToAllExperts(comm, placement, layer)
                    pending = [a2a.dispatch(x[a:b], ids[a:b]) for a, b in parts]
                    y = torch.cat([a2a.combine(p) for p in pending])
                    expected = _reference_experts()(x, ids)
                    results[(rank, step, layer)] = float((y - expected).abs().max()) if len(x) else 0.0
                    assert len(y) == len(x)
            else:
                count = _agree(comm, [])
                for layer in LAYERS:
                    experts = _reference_experts(placement.experts_on(rank, layer))
                    load_E = torch.zeros(E, dtype=torch.long)
                    served = sum(int(serve_layer(comm, experts, load_E=load_E, sync_free=sync_free))
                                 for _ in range(count))
                    assert served == int(load_E.sum())  # padding counts for no expert
                    assert not load_E[[e for e in range(E) if e not in experts.expert_ids]].any()
                    results[(rank, step, layer, "served")] = served
        dist.destroy_process_group()
    except Exception:
        results[(rank, "error")] = traceback.format_exc()


@pytest.mark.parametrize("num_attention,num_experts,case", [
    (1, 1, "random"), (1, 2, "random"), (2, 2, "random"), (2, 1, "one_expert"), (2, 2, "zero_on_rank1"),
    (1, 4, "empty"), (1, 3, "random"), (2, 3, "zero_on_rank1"),  # 8 experts over 3 ranks: 3, 3, 2
])
def test_dispatch_combine_equals_local_experts(tmp_path, num_attention, num_experts, case):
    _check_dispatch_combine(tmp_path, num_attention, num_experts, case)


@pytest.mark.parametrize("num_attention,num_experts,case", [(1, 2, "random"), (2, 3, "zero_on_rank1"),
                                                            (1, 4, "empty")])
def test_sync_free_expert_side_equals_local_experts(tmp_path, num_attention, num_experts, case):
    """The GPU expert path (`forward_padded`: grouped GEMMs over device-side offsets, padding rows
    carried through), run here on CPU tensors: the same outputs and the same counts."""
    _check_dispatch_combine(tmp_path, num_attention, num_experts, case, sync_free=True)


@pytest.mark.parametrize("num_attention,num_experts,case", [(1, 2, "random"), (2, 2, "random"),
                                                            (2, 3, "zero_on_rank1"), (1, 1, "empty")])
def test_two_microbatches_in_flight_equal_local_experts(tmp_path, num_attention, num_experts, case):
    """Ping-pong's order of collectives: micro-batch 1 dispatched before micro-batch 0 is combined."""
    _check_dispatch_combine(tmp_path, num_attention, num_experts, case, split=True)


@pytest.mark.parametrize("num_attention,num_experts,case", [(1, 3, "one_expert"), (2, 2, "one_expert"),
                                                            (1, 3, "random"), (2, 3, "zero_on_rank1")])
def test_replicated_experts_split_their_rows_and_equal_local_experts(tmp_path, num_attention, num_experts, case):
    """EPLB's placement: a hot expert on every expert rank. Its rows split evenly over its replicas
    (the k-th row of an expert to replica k mod count), and every output equals the local path's."""
    _check_dispatch_combine(tmp_path, num_attention, num_experts, case, replicated=True)


def _check_dispatch_combine(tmp_path, num_attention, num_experts, case, sync_free=False, split=False,
                            replicated=False):
    world = num_attention + num_experts
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    store = str(tmp_path / "store")
    mp.start_processes(_worker, args=(world, num_attention, case, store, results, sync_free, split, replicated),
                       nprocs=world,
                       start_method="spawn", join=True)
    results = dict(results)
    errors = {k: v for k, v in results.items() if "error" in k}
    assert not errors, errors
    def rows_of(attention_rank, step):
        return len(_inputs(attention_rank, case, step)[0])

    for step in range(STEPS):
        rows = sum(rows_of(r, step) for r in range(num_attention))
        for layer in LAYERS:
            assert all(results[(rank, step, layer)] <= 1e-5 for rank in range(num_experts, world))
            served = [results[(r, step, layer, "served")] for r in range(num_experts)]
            assert sum(served) == rows  # every routed row visited exactly one expert rank, once per layer
            if case == "one_expert" and num_experts == 1:
                assert served[0] == rows
            if case == "one_expert" and replicated:  # one hot expert, one copy per expert rank: even shares,
                # each attention rank's remainder adding at most one row to some ranks
                assert max(served) - min(served) <= num_attention, served


def test_uneven_placement_splits_as_evenly_as_counts_allow():
    p = Placement.contiguous([1], 128, list(range(2, 8)))
    counts = [len(p.experts_on(r, 1)) for r in range(2, 8)]
    assert counts == [22, 22, 21, 21, 21, 21]
    assert sum((p.experts_on(r, 1) for r in range(2, 8)), []) == list(range(128))  # consecutive, all once
    with pytest.raises(ValueError, match="at least one"):
        Placement.contiguous([1], 4, list(range(5)))


def test_placement_contiguous_and_replicas():
    p = Placement.contiguous([1, 3], 8, [2, 3])
    assert p.experts_on(2, 1) == [0, 1, 2, 3] and p.experts_on(3, 3) == [4, 5, 6, 7]
    assert p.destinations(1, torch.tensor([0, 7, 4, 3])).tolist() == [2, 3, 3, 2]
    replicated = Placement({1: [[2, 3]] + [[2]] * 7})  # expert 0 on both ranks
    assert set(replicated.destinations(1, torch.zeros(6, dtype=torch.long)).tolist()) == {2, 3}
    assert replicated.experts_on(3, 1) == [0]
    # replica counts differ: expert 0 on three ranks, expert 1 on two; each expert's rows alternate over
    # its own replicas (padding to the widest list must not give replica 0 an extra share)
    uneven = Placement({1: [[2, 3, 4], [3, 4]] + [[2]] * 6})
    rows = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1, 1])
    assert uneven.destinations(1, rows).tolist() == [3, 2, 4, 3, 3, 4, 4, 3, 4, 3]


def test_placement_check_names_what_is_wrong():
    Placement.contiguous([1, 3], 8, [2, 3]).check([1, 3], 8, [2, 3])
    with pytest.raises(ValueError, match="MoE layers"):
        Placement.contiguous([1], 8, [2, 3]).check([1, 3], 8, [2, 3])
    with pytest.raises(ValueError, match="7 experts placed"):
        Placement({1: [[2]] * 7}).check([1], 8, [2, 3])
    with pytest.raises(ValueError, match="needs a rank"):
        Placement({1: [[2]] * 7 + [[]]})
    with pytest.raises(ValueError, match="not expert ranks"):
        Placement({1: [[1]] * 8}).check([1], 8, [2, 3])
