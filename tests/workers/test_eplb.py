"""Live rebalancing on one rank, without a gang: when it decides, how it votes, when it switches, and
the expert slots it fills in place."""

import threading

import torch

from model.kernel_modules import experts_out_in
from model.moe import FREE, RoutedExperts, experts_for_loop, fill_slots, held_experts, pad_slots
from model.quant import Fp8RoutedExperts, quantize_rows
from workers.config import EplbSettings
from workers.eplb import FAILED, READY, STAGING, Rebalancer
from workers.expert_parallel import Placement
from workers.expert_placement import place_experts, to_rank_table

D, F, E, LAYERS = 8, 12, 6, [1, 3]


def experts(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    full_gu, full_down = torch.randn(E, D, 2 * F, generator=g), torch.randn(E, F, D, generator=g)
    m = RoutedExperts(D, F, ids, E)
    m.gate_up_proj.data, m.down_proj.data = full_gu[ids].clone(), full_down[ids].clone()
    return m


def test_fill_slots_puts_new_experts_in_the_rows_of_dropped_ones_in_place():
    slots, read = experts([0, 2, 4]), experts([1, 5])
    storage = slots.gate_up_proj.data_ptr()
    out = fill_slots(slots, [5, 2, 1], read)  # drops 0 and 4, keeps 2, takes 1 and 5
    assert out is slots and slots.gate_up_proj.data_ptr() == storage  # no second copy of the slots
    assert slots.expert_ids == [5, 2, 1] and held_experts(slots) == [5, 2, 1]
    x, ids = torch.randn(7, D), torch.tensor([5, 1, 2, 2, 5, 1, 5])
    assert torch.equal(slots(x, ids), experts_for_loop(experts([1, 2, 5]), x, ids))
    assert read.expert_ids == [1, 5]  # the source is untouched
    fewer = fill_slots(slots, [2], experts([]))  # a slot the placement leaves empty holds no expert
    assert fewer.expert_ids == [FREE, 2, FREE] and held_experts(fewer) == [2]
    assert fewer.local_index_E.tolist() == [-1, -1, 1, -1, -1, -1]
    more = fill_slots(fewer, [0, 1, 2, 3], experts([0, 1, 3]))  # outgrows its rows: a larger module
    assert more is not fewer and sorted(more.expert_ids) == [0, 1, 2, 3]
    x, ids = torch.randn(6, D), torch.tensor([0, 3, 1, 2, 2, 0])
    assert torch.equal(more(x, ids), experts_for_loop(experts([0, 1, 2, 3]), x, ids))


def test_padded_slots_are_filled_in_place_and_keep_the_kernel_layout():
    slots = pad_slots(experts([0, 2]), 4)  # at load, before the CPU kernels' layout
    assert slots.expert_ids == [0, 2, FREE, FREE] and slots.gate_up_proj.shape[0] == 4
    experts_out_in(slots)
    storage, strides = slots.gate_up_proj.data_ptr(), slots.gate_up_proj.stride()
    fill_slots(slots, [0, 2, 3, 5], experts([3, 5]))  # the free rows take the new experts: no allocation
    assert slots.gate_up_proj.data_ptr() == storage and slots.gate_up_proj.stride() == strides
    x, ids = torch.randn(6, D), torch.tensor([5, 3, 0, 2, 5, 3])
    reference = experts([0, 2, 3, 5])
    experts_out_in(reference)  # the same layout, so the same GEMMs bit for bit
    assert torch.equal(slots(x, ids), reference(x, ids))
    grown = fill_slots(slots, [0, 1, 2, 3, 5], experts([1]))  # past the rows: a new module, same layout
    assert grown is not slots and grown.gate_up_proj.stride() == experts_out_in_strides(5)


def experts_out_in_strides(rows):
    m = experts(list(range(rows)))
    experts_out_in(m)
    return m.gate_up_proj.stride()


def test_fill_slots_keeps_fp8_experts_fp8_and_the_cpu_kernels_layout():
    def fp8(ids):
        m = Fp8RoutedExperts(D, F, ids, E)
        src = experts(ids)
        gu, gu_s = zip(*(quantize_rows(w.T.contiguous()) for w in src.gate_up_proj))
        dn, dn_s = zip(*(quantize_rows(w.T.contiguous()) for w in src.down_proj))
        m.gate_up_weight.data, m.gate_up_weight_scale.data = torch.stack(gu), torch.stack(gu_s)
        m.down_weight.data, m.down_weight_scale.data = torch.stack(dn), torch.stack(dn_s)
        m.reset_buffers()
        return m

    slots = fill_slots(fp8([0, 2]), [4, 0], fp8([4]))
    assert isinstance(slots, Fp8RoutedExperts) and slots.gate_up_weight.dtype == fp8([0]).gate_up_weight.dtype
    x, ids = torch.randn(5, D), torch.tensor([0, 4, 4, 0, 4])
    assert torch.equal(slots(x, ids), fp8([0, 4])(x, ids))
    transposed = experts([0, 2])
    experts_out_in(transposed)  # the CPU kernels' [out, in] storage
    strides = transposed.gate_up_proj.stride()
    fill_slots(transposed, [0, 3], experts([3]))
    assert transposed.gate_up_proj.stride() == strides
    assert torch.equal(transposed.gate_up_proj[1], experts([3]).gate_up_proj[0])


class Load:
    """An expert rank's counters since start, as `ExpertWorker.expert_load_LE`."""

    def __init__(self):
        self.LE = torch.zeros(len(LAYERS), E, dtype=torch.long)

    def add(self, per_expert):
        self.LE += torch.tensor(per_expert)


def rebalancer(every, window=0, stage=None, load=None, placement=None, min_gain=0.0, weight_read_rows=0.0):
    capacities = [4, 4]  # 6 experts over 2 expert ranks, plus one spare slot each
    placement = placement or Placement.contiguous(LAYERS, E, [0, 1])
    return Rebalancer(EplbSettings(1, every, window, min_gain, weight_read_rows), placement, LAYERS, E, capacities, None,
                      torch.device("cpu"), load=load and (lambda: load.LE), stage=stage)


HOT = [90, 2, 2, 2, 2, 2]  # expert 0 takes most rows; contiguous, rank 0 (experts 0-2) does 94 of 100


def test_a_rebalance_is_decided_every_n_steps_staged_then_switched_when_the_gang_agrees():
    load, release, staged = Load(), threading.Event(), []

    def stage(placements):
        release.wait(10)
        staged.append(placements)
        return (lambda: staged.append("installed")), 123

    r = rebalancer(every=3, load=load, stage=stage)
    for _ in range(2):
        load.add(HOT)
        r.after_step()
    assert r.vote() == READY and not staged  # not yet: 2 steps of 3
    load.add(HOT)
    r.after_step()  # the decision: the policy runs, staging starts on its own thread
    assert r.vote() == STAGING
    r.before_step(STAGING)  # another rank still stages: nothing changes
    assert r.placement.table[1][0] == [0]
    release.set()
    for _ in range(100):
        if r.vote() == READY:
            break
        threading.Event().wait(0.05)
    assert r.vote() == READY
    r.before_step(READY)
    assert staged[-1] == "installed"
    assert r.placement.table[1][0] == [0, 1]  # the hot expert now on both ranks
    s = r.stats
    assert (s.rebalances, s.bytes_total, s.switches) == (1, 123, ((3, 3),))
    assert s.balancedness[1] < 0.6 < 0.9 < s.planned[1]
    assert r.vote() == READY


def test_the_window_is_the_last_steps_before_the_rebalance():
    load = Load()
    r = rebalancer(every=4, window=2, load=load, stage=lambda p: ((lambda: None), 0))
    for hot in (5, 5, 0, 0):  # the first two steps favour expert 5, the window's two expert 0
        per_expert = [0] * E
        per_expert[hot] = 50
        load.add([per_expert, per_expert])
        r.after_step()
    while r.vote() == STAGING:
        threading.Event().wait(0.01)
    r.before_step(READY)
    assert len(r.placement.table[1][0]) == 2 and len(r.placement.table[1][5]) == 1


def test_a_failed_staging_is_dropped_by_every_rank_and_the_table_stays():
    def stage(placements):
        raise OSError("checkpoint gone")

    load = Load()
    r = rebalancer(every=1, load=load, stage=stage)
    before = r.placement.table
    load.add(HOT)
    r.after_step()
    while r.vote() == STAGING:
        threading.Event().wait(0.01)
    assert r.vote() == FAILED
    r.before_step(FAILED)
    assert r.placement.table == before and r.stats.rebalances == 0 and r.vote() == READY


def test_a_rank_without_a_stage_swaps_its_table_at_once_and_an_unchanged_placement_moves_nothing():
    placed = place_experts({layer: HOT for layer in LAYERS}, [4, 4])
    load = Load()
    r = rebalancer(every=1, load=load, placement=Placement(to_rank_table(placed)))
    load.add(HOT)
    r.after_step()  # the same load: the policy returns the placement it has
    assert r.vote() == READY and r.stats.unchanged == 1
    attention = rebalancer(every=1)  # counts nothing itself: with no group, it sees zeros
    attention.after_step()
    assert attention.stats.unchanged == 0 and attention.vote() == READY


def test_no_rebalance_without_a_period():
    load = Load()
    r = rebalancer(every=0, load=load, stage=lambda p: 1 / 0)
    for _ in range(10):
        load.add(HOT)
        r.after_step()
    assert r.vote() == READY and r.stats == type(r.stats)()


def test_a_placement_that_gains_too_little_is_not_adopted():
    load = Load()
    r = rebalancer(every=1, load=load, stage=lambda p: 1 / 0, min_gain=0.5)
    load.add(HOT)  # contiguous serves it at 0.53, the policy would at 0.98: a gain of 0.45 < 0.5
    r.after_step()
    assert r.vote() == READY and r.stats.unchanged == 1 and r.placement.table[1][0] == [0]
    assert r.stats.balancedness[1] < 0.6 < 0.9 < r.stats.planned[1]  # what it measured is still told


def test_with_weight_reads_counted_the_gain_is_the_busiest_ranks_modelled_cost():
    load = Load()
    # per step 3 rows on expert 0 and 1 each on experts 1 and 2, all on rank 0 (experts 0-2), against a
    # weight read of 20 rows. In rows the best placement gains 0.33 balancedness (below min_gain 0.4);
    # in modelled cost it lowers the busiest rank by 45%: adopted.
    hot = [3, 1, 1, 0, 0, 0]
    r = rebalancer(every=4, load=load, stage=lambda p: (lambda: None, 0), weight_read_rows=20.0, min_gain=0.4)
    for _ in range(4):
        load.add(hot)
        r.after_step()
    assert r._pending is not None, r.stats
    placement = r._pending.placements[1]
    assert placement.replica_counts()[0] == 1  # a copy would add a read to halve 3 rows: it does not pay
    assert placement.replicas[1][0].rank == placement.replicas[2][0].rank != placement.replicas[0][0].rank
