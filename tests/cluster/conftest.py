"""One real multi-node Ray cluster (ray.cluster_utils.Cluster, 3 nodes) per test module."""

import os

import pytest

from tests import ray_start
from tests.oracle import MAVERICK_LIKE, hf_model, hf_text_config, save_conditional

CHUNK = 20


def multi_node_cluster(nodes: int, cpus_per_node: int):
    """A real Ray cluster of `nodes` nodes on this machine, connected; yields it, then shuts it down."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    def create():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        return cluster

    cluster = ray_start.start(create)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    yield from multi_node_cluster(3, 2)


@pytest.fixture(scope="module")
def gang_checkpoint(tmp_path_factory):
    hf = hf_model(hf_text_config(MAVERICK_LIKE, attention_chunk_size=CHUNK, max_position_embeddings=1024), seed=11)
    out = save_conditional(hf, tmp_path_factory.mktemp("gang") / "ckpt")
    return out, hf
