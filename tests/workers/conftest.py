"""A transformers-written checkpoint whose chunk size (20) is a multiple of no block size we use."""

import pytest

from tests.oracle import MAVERICK_LIKE, hf_model, hf_text_config, save_conditional

CHUNK = 20


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    hf = hf_model(hf_text_config(MAVERICK_LIKE, attention_chunk_size=CHUNK, max_position_embeddings=1024), seed=11)
    out = save_conditional(hf, tmp_path_factory.mktemp("engine") / "ckpt")
    return out, hf
