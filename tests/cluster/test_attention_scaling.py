"""The attention scaling policy, on readings made up here: what it wants, when it acts, and the config
that feeds it. (The resize itself: tests/cluster/test_gang.py; on a KV-bound load through the
ingress: tests/router/test_attention_autoscaling.py.)"""

import pytest

from cluster.attention_scaling import AttentionLoad, AttentionScalingPolicy, attention_load
from cluster.config import AttentionScalingConfig, GangConfig, parse_app_args

SETTINGS = AttentionScalingConfig(min_attention_workers=1, max_attention_workers=3, kv_high=0.8, waiting_high=2,
                                  expert_busy_max=0.5, kv_low=0.4, window_s=2, cooldown_s=10)


def load(ranks=1, kv=0.0, waiting=0, running=0, busy=0.1):
    return AttentionLoad(ranks, kv, waiting, running, busy)


@pytest.mark.parametrize("reading,wanted", [
    (load(kv=0.85), ("up", "kv")),
    (load(ranks=2, kv=0.5, waiting=4), ("up", "queue")),  # 2 per rank
    (load(ranks=2, kv=0.5, waiting=3), None),
    (load(kv=0.9, busy=0.6), None),  # the expert ranks are the bottleneck: another attention rank would not help
    (load(ranks=3, kv=0.95, waiting=9), None),  # at the maximum
    (load(ranks=2, kv=0.15), ("down", "idle")),  # 0.15 x 2 on one rank is 0.3 < 0.4
    (load(ranks=2, kv=0.25), None),  # 0.5 on one rank: too full
    (load(ranks=2, kv=0.1, waiting=1), None),  # something waits
    (load(ranks=1, kv=0.0), None),  # at the minimum
])
def test_what_a_reading_asks_for(reading, wanted):
    assert AttentionScalingPolicy(SETTINGS).want(reading) == wanted


def test_a_want_must_hold_for_the_window_and_not_within_the_cooldown():
    policy = AttentionScalingPolicy(SETTINGS)
    high = load(kv=0.9)
    assert policy.observe(0.0, high) is None
    assert policy.observe(1.0, high) is None
    assert policy.observe(1.5, load(kv=0.5)) is None  # the condition broke: the window starts again
    assert policy.observe(2.0, high) is None
    decision = policy.observe(4.0, high)
    assert (decision.direction, decision.reason, decision.load) == ("up", "kv", high)
    assert "KV 90% over 1 attention rank(s)" in decision.describe()
    policy.changed(4.0)
    two = load(ranks=2, kv=0.9)
    assert policy.observe(5.0, two) is None and policy.observe(13.0, two) is None  # cooldown until 14
    assert policy.observe(14.5, two).direction == "up"


def test_the_load_is_read_from_the_ranks_reports():
    def stats(used, total, running, waiting):
        return {"kv": {"blocks_used": used, "blocks_total": total}, "running": running, "waiting": waiting}

    reading = attention_load([stats({"full": 30, "chunked": 10}, {"full": 40, "chunked": 40}, 3, 1),
                              stats({"full": 0, "chunked": 0}, {"full": 40, "chunked": 0}, 0, 2)],
                             expert_compute_s=[0.5, 1.5], elapsed_s=2.0)
    assert reading == AttentionLoad(ranks=2, kv_use=0.375, waiting=3, running=3, expert_busy=0.75)


def test_the_config_is_checked_against_the_gang():
    scaling = {"min_attention_workers": 1, "max_attention_workers": 2}
    GangConfig(model="m", expert_workers=2, attention_scaling=scaling)
    with pytest.raises(ValueError, match="needs expert_workers >= 1"):
        GangConfig(model="m", attention_scaling=scaling)
    with pytest.raises(ValueError, match="not built for NCCL"):
        GangConfig(model="m", expert_workers=1, device="cuda", attention=dict(num_gpus=1), experts=dict(num_gpus=1),
                   attention_scaling=scaling)
    with pytest.raises(ValueError, match=r"attention_workers \(3\) must lie within"):
        GangConfig(model="m", expert_workers=1, attention_workers=3, attention_scaling=scaling)
    with pytest.raises(ValueError, match=r"args\.attention_scaling: .*below min_attention_workers"):
        parse_app_args({"model": "m", "expert_workers": 1,
                        "attention_scaling": {"min_attention_workers": 2, "max_attention_workers": 1}})
