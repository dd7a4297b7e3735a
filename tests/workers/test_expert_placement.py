"""EPLB's placement policy, balancedness and token split (`workers.expert_placement`), pure functions."""

import pytest
import torch

from model.moe import RoutedExperts, experts_for_loop
from workers.expert_parallel import Placement
from workers.expert_placement import (
    CostModel, balancedness, contiguous_placement, place_experts, place_layer, rank_costs, replica_of_rows,
    to_rank_table)

SKEWED = [900, 700, 30, 20, 10, 10, 5, 5]  # two hot experts, as make-tiny --router-skew writes them


def test_every_expert_placed_and_capacities_respected():
    for capacities in ([5, 5, 4], [3, 3, 2], [6, 2, 3], [8, 1, 1], [4, 4, 4, 4]):
        p = place_layer(SKEWED, capacities)
        assert all(len(r) >= 1 for r in p.replicas)
        assert [len(s) for s in p.slots] == capacities  # every slot filled
        for e, replicas in enumerate(p.replicas):
            for r in replicas:
                assert p.slots[r.rank][r.slot] == e
            assert len({r.rank for r in replicas}) == len(replicas)  # no two copies on one rank


def test_uneven_capacities_and_no_spare_slots():
    p = place_layer(SKEWED, [3, 3, 2])
    assert p.replica_counts() == [1] * 8
    assert sorted(e for s in p.slots for e in s) == list(range(8))
    # the two hot experts no longer share a rank
    assert p.replicas[0][0].rank != p.replicas[1][0].rank


def test_a_replica_with_no_fresh_rank_leaves_its_slot_free():
    # 2 spare slots, but the small rank fills with the hot expert's copy: expert 1's second copy
    # could only share rank 0 with its first, so it is dropped rather than placed twice
    p = place_layer([10, 1, 1], [4, 1])
    assert p.slots == ((0, 1, 2), (0,))
    assert p.replica_counts() == [2, 1, 1]


def test_hot_experts_get_the_replicas():
    p = place_layer(SKEWED, [5, 5, 4])  # 6 spare slots
    # the hot pair stops at one copy per rank (3); the two slots left go to the next heaviest
    assert p.replica_counts() == [3, 3, 2, 2, 1, 1, 1, 1]
    assert place_layer([10, 1, 1, 1], [2, 2, 1]).replica_counts() == [2, 1, 1, 1]


def test_highest_load_per_replica_wins_each_spare_slot():
    # 100 / 2 = 50 still beats 40: the first expert takes two spare slots before the second gets one
    assert place_layer([100, 40, 1, 1], [2, 2, 2]).replica_counts() == [3, 1, 1, 1]
    assert place_layer([100, 40, 1, 1], [3, 2, 2]).replica_counts() == [3, 2, 1, 1]  # then 40 beats 33
    assert place_layer([100, 60, 1, 1], [2, 2, 2]).replica_counts()[:2] == [2, 2]


def test_a_costless_weight_read_is_the_published_greedy():
    for capacities in ([5, 5, 4], [3, 3, 2], [6, 2, 3]):
        assert place_layer(SKEWED, capacities, CostModel(0.0, steps=50)) == place_layer(SKEWED, capacities)


# per step over 64 steps: a hot pair of 13.6 rows each, 14 cold experts sharing 4.8 rows (bench ep's skew at 32)
STEPS = 64
SKEWED_32 = [int(13.6 * STEPS)] * 2 + [int(4.8 / 14 * STEPS)] * 14


def test_where_weight_reads_dominate_the_hot_pair_is_split_not_copied():
    cost = CostModel(weight_rows=18, steps=STEPS)  # this machine's fp32 bench experts: a read is ~18 rows
    capacities = [8, 7, 7]  # 16 experts over 3 ranks, 2 spare slots each
    rows_only = place_layer(SKEWED_32, capacities)
    p = place_layer(SKEWED_32, capacities, cost)
    assert rows_only.replica_counts()[:2] == [3, 3]  # a copy of each hot expert on every rank
    assert sum(p.replica_counts()[:2]) <= 3  # at most one copy: each is a whole read for half the rows
    assert not {r.rank for r in p.replicas[0]} & {r.rank for r in p.replicas[1]}  # the pair apart
    contiguous = max(rank_costs(contiguous_placement(16, [6, 5, 5]), SKEWED_32, cost))
    busiest = max(rank_costs(p, SKEWED_32, cost))
    assert contiguous / busiest > 1.5 > contiguous / max(rank_costs(rows_only, SKEWED_32, cost))
    assert [len(s) <= c for s, c in zip(p.slots, capacities)] == [True] * 3
    assert sorted({e for s in p.slots for e in s}) == list(range(16))


def test_where_rows_dominate_the_hot_experts_are_still_copied():
    # 400 rows per step of each hot expert against a read of 18 rows: copies pay for their reads
    load = [400 * STEPS] * 2 + [STEPS] * 14
    p = place_layer(load, [8, 7, 7], CostModel(weight_rows=18, steps=STEPS))
    assert p.replica_counts()[:2] == [3, 3]


def test_the_busiest_rank_costs_no_more_than_under_any_number_of_copies():
    from workers.expert_placement import pack, replicate

    cost = CostModel(weight_rows=6, steps=STEPS)
    for load in (SKEWED_32, [50 * STEPS, 3 * STEPS] + [STEPS] * 14, [STEPS * 2] * 16):
        chosen = max(rank_costs(place_layer(load, [8, 7, 7], cost), load, cost))
        for spares in range(7):
            other = pack(load, replicate(load, 16 + spares, 3), [8, 7, 7], cost)
            assert chosen <= max(rank_costs(other, load, cost)) + 1e-9


def test_deterministic():
    load = {1: SKEWED, 3: list(reversed(SKEWED))}
    assert place_experts(load, [5, 5, 4]) == place_experts(dict(load), [5, 5, 4])
    tie = place_layer([7] * 8, [4, 4, 3])
    assert tie == place_layer([7] * 8, [4, 4, 3])


def test_uniform_load_leaves_the_balance_alone():
    uniform = [50] * 8
    assert balancedness(place_layer(uniform, [4, 4]).rank_tokens(uniform)) == 1.0
    for capacities, experts_per_rank in (([3, 3, 2], [3, 3, 2]), ([4, 4, 3], [3, 3, 2])):
        before = balancedness(contiguous_placement(8, experts_per_rank).rank_tokens(uniform))
        after = balancedness(place_layer(uniform, capacities).rank_tokens(uniform))
        assert after >= before - 1e-9


def test_balancedness_improves_on_a_skewed_load():
    before = balancedness(contiguous_placement(8, [3, 3, 2]).rank_tokens(SKEWED))
    assert before < 0.4  # experts 0 and 1 on one rank: 1600 of 1680 tokens
    no_spares = balancedness(place_layer(SKEWED, [3, 3, 2]).rank_tokens(SKEWED))
    with_spares = balancedness(place_layer(SKEWED, [5, 5, 4]).rank_tokens(SKEWED))
    assert before < no_spares < with_spares
    assert with_spares >= 0.9


def test_balancedness_definition():
    assert balancedness([10, 10, 10]) == 1.0
    assert balancedness([30, 0, 0]) == pytest.approx(1 / 3)
    assert balancedness([0, 0]) == 1.0


def test_rejects_too_few_slots():
    with pytest.raises(ValueError, match="8 experts do not fit in 7 slots"):
        place_layer(SKEWED, [3, 2, 2])


def test_rank_table_is_a_valid_dispatch_placement():
    placements = place_experts({1: SKEWED, 3: SKEWED[::-1]}, [5, 5, 4])
    table = to_rank_table(placements)
    Placement(table).check([1, 3], 8, [0, 1, 2])
    assert set(table[1][0]) == {0, 1, 2}


def test_token_split_is_even_and_depends_only_on_the_rows():
    experts_N = torch.tensor([0, 1, 0, 0, 2, 0, 1, 0, 0, 3])
    replicas_E = torch.tensor([3, 2, 1, 1])
    replica_N = replica_of_rows(experts_N, replicas_E)
    assert replica_N.tolist() == [0, 0, 1, 2, 0, 0, 1, 1, 2, 0]  # k-th row of expert e -> k mod replicas
    for e, c in enumerate(replicas_E.tolist()):
        per_replica = torch.bincount(replica_N[experts_N == e], minlength=c)
        assert per_replica.max() - per_replica.min() <= 1
    assert torch.equal(replica_N, replica_of_rows(experts_N.clone(), replicas_E.clone()))


def test_the_round_robin_continues_across_calls_so_small_calls_reach_every_replica():
    """Decode: an expert gets fewer rows per call than it has replicas. Starting each call afresh,
    the first replica would serve nearly every row; continuing the round, each serves its share."""
    replicas_E, next_E = torch.tensor([3, 1]), torch.zeros(2, dtype=torch.long)
    served = torch.zeros(3, dtype=torch.long)
    fixed = torch.zeros(3, dtype=torch.long)
    for n in [1, 2, 1, 1, 2, 1, 1, 2, 1]:  # 12 rows of expert 0 over 9 calls
        experts_N = torch.tensor([1] + [0] * n)
        served += torch.bincount(replica_of_rows(experts_N, replicas_E, next_E)[1:], minlength=3)
        fixed += torch.bincount(replica_of_rows(experts_N, replicas_E)[1:], minlength=3)
    assert served.tolist() == [4, 4, 4] and next_E.tolist() == [12, 9]
    assert fixed.tolist() == [9, 3, 0]


def test_split_counts_match_rank_tokens():
    p = place_layer(SKEWED, [5, 5, 4])
    experts_N = torch.repeat_interleave(torch.arange(8), torch.tensor(SKEWED))[torch.randperm(sum(SKEWED))]
    replica_N = replica_of_rows(experts_N, torch.tensor(p.replica_counts()))
    served = [0, 0, 0]
    for e, j in zip(experts_N.tolist(), replica_N.tolist()):
        served[p.replicas[e][j].rank] += 1
    assert served == p.rank_tokens(SKEWED)


def test_outputs_do_not_depend_on_placement():
    """Rows split over replicas (copies of the expert, computing their rows apart) give what one
    copy gives, whichever replica counts the placement chose."""
    gen = torch.Generator().manual_seed(0)
    experts = RoutedExperts(16, 8, list(range(4)), 4)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x_ND = torch.randn(40, 16, generator=gen)
    experts_N = torch.randint(0, 4, (40,), generator=gen)
    reference_ND = experts_for_loop(experts, x_ND, experts_N)
    for counts in ([1, 1, 1, 1], [3, 2, 1, 1], [2, 2, 2, 2]):
        replica_N = replica_of_rows(experts_N, torch.tensor(counts))
        y_ND = torch.empty_like(x_ND)
        for e, c in enumerate(counts):
            for j in range(c):
                rows = torch.nonzero((experts_N == e) & (replica_N == j)).squeeze(1)
                if rows.numel():
                    y_ND[rows] = experts(x_ND[rows], experts_N[rows])
        torch.testing.assert_close(y_ND, reference_ND, rtol=0, atol=1e-5)
