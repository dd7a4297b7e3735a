"""Prefix affinity balanced against load (`cluster.routing`): a key keeps its target while other
targets come and go, a much busier preferred target is passed over, and a prompt without a key goes
to the least busy."""

import pytest

from cluster.routing import DEFAULT_PREFIX_TOKENS, affinity_key, pick

KEYS = [affinity_key([7, i] + [3] * (DEFAULT_PREFIX_TOKENS - 2)) for i in range(200)]


def test_a_key_keeps_its_gang_when_another_gang_leaves_or_joins():
    gangs = ["gang-a1", "gang-b2", "gang-c3"]
    before = {k: gangs[pick(k, [0] * 3, names=gangs)] for k in KEYS}
    assert set(before.values()) == set(gangs)  # every gang gets some keys
    left = ["gang-a1", "gang-c3"]  # b2 scaled down
    after = {k: left[pick(k, [0] * 2, names=left)] for k in KEYS}
    assert all(after[k] == before[k] for k in KEYS if before[k] != "gang-b2")  # only b2's keys move
    joined = gangs + ["gang-d4"]
    again = {k: joined[pick(k, [0] * 4, names=joined)] for k in KEYS}
    assert all(again[k] in (before[k], "gang-d4") for k in KEYS)  # keys move only to the newcomer
    assert 0 < sum(again[k] == "gang-d4" for k in KEYS) < len(KEYS)


def test_by_index_the_same_targets_keep_the_same_keys():
    assert [pick(k, [0] * 3) for k in KEYS] == [pick(k, [5] * 3) for k in KEYS]


def test_a_much_busier_preferred_target_is_passed_over():
    key = KEYS[0]
    preferred = pick(key, [0, 0, 0])
    loads = [0, 0, 0]
    loads[preferred] = 4  # within the slack: still preferred
    assert pick(key, loads) == preferred
    loads[preferred] = 10  # 10 > 0 + 4 and > 1.5 x 0: the least busy instead
    assert pick(key, loads) != preferred and loads[pick(key, loads)] == 0


def test_without_a_key_or_ready_targets():
    assert affinity_key([1, 2, 3]) is None  # shorter than the prefix
    assert pick(None, [3, 1, 2]) == 1
    assert pick(None, [3, 1, 2], available=[0, 2]) == 2
    with pytest.raises(ValueError, match="no target available"):
        pick(None, [1], available=[])
