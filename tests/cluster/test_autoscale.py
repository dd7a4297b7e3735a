"""The gang autoscaling policy Serve's controller calls (`cluster.autoscale`), on the context it passes:
how many gangs a load wants, that a policy failure never moves the count, and that every change Serve
applies is logged with its figures."""

import logging

from types import SimpleNamespace

from cluster.autoscale import CAPACITY, REQUESTS, GangLoadPolicy, gangs_wanted, scaling_reason


def context(requests: dict, capacity: dict, current: int = 1, target: int = 1, minimum: int = 1):
    """What Serve 2.60 passes (`ray.serve.config.AutoscalingContext`): the fields the policy reads."""
    return SimpleNamespace(aggregated_metrics={REQUESTS: requests, CAPACITY: capacity},
                           current_num_replicas=current, target_num_replicas=target,
                           capacity_adjusted_min_replicas=minimum)


def test_gangs_wanted_carry_the_load_at_the_target():
    assert gangs_wanted(0, 32, 0.75, 1) == 1  # idle: the floor
    assert gangs_wanted(24, 32, 0.75, 1) == 1  # exactly at the target
    assert gangs_wanted(25, 32, 0.75, 1) == 2
    assert gangs_wanted(100, 32, 0.5, 1) == 7
    assert gangs_wanted(3, 32, 0.75, 2) == 2  # never below the floor
    assert gangs_wanted(5, 0, 0.75, 1) == 1  # no capacity reported: the floor


def test_the_policy_sums_every_gang_and_sizes_by_the_largest_capacity():
    policy = GangLoadPolicy(target_load=0.5)
    desired, state = policy(context({"a": 6.0, "b": 3.5}, {"a": 8.0, "b": 8.0}, current=2, target=2))
    assert desired == 3 and state == {"gang_requests": 9.5, "gangs_wanted": 3}
    assert policy(context({"a": 1.0}, {"a": 8.0}, current=2, target=2))[0] == 1  # quiet: fewer gangs


def test_before_any_report_and_on_a_broken_context_the_count_stays():
    policy = GangLoadPolicy()
    assert policy(context({}, {}, current=3, target=3))[0] == 3
    broken = SimpleNamespace(target_num_replicas=2, aggregated_metrics={REQUESTS: {"a": "x"}, CAPACITY: {"a": 4}},
                             current_num_replicas=2, capacity_adjusted_min_replicas=1)
    assert policy(broken) == (2, {})


def test_a_target_serve_moved_is_logged_with_the_load_behind_it(caplog):
    policy = GangLoadPolicy(target_load=0.5)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        assert policy(context({"a": 6.0}, {"a": 4.0}, current=1, target=1))[0] == 3
        policy(context({"a": 6.0}, {"a": 4.0}, current=1, target=3))  # Serve applied it
        policy(context({"a": 6.0}, {"a": 4.0}, current=3, target=3))  # no change: nothing logged
    events = [r.getMessage() for r in caplog.records if "gang scaling" in r.getMessage()]
    assert events == ["gang scaling up (load): 1 -> 3 gangs; 6.0 requests over 1 gangs of capacity 4, "
                      "target 0.50"], events


def test_the_reason_is_the_load_only_when_the_policy_pointed_that_way():
    assert scaling_reason(1, 3, wanted=3) == "load"
    assert scaling_reason(3, 2, wanted=1) == "load"
    assert scaling_reason(1, 2, wanted=1) == "bounds"  # a redeploy raised min_gangs
    assert scaling_reason(2, 1, wanted=None) == "bounds"
