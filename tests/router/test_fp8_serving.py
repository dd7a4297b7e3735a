"""The tiny FP8 checkpoint served over HTTP by an A=1, E=2 gang (`deploy/tiny-fp8-cpu.yaml`'s args): greedy
tokens equal transformers on the dequantized weights, and each expert rank holds its experts in FP8."""

import openai
import pytest
import torch

from router.app import prepare_args
from tests.oracle import dequantized_copy, hf_greedy
from tests.router.conftest import deploy

pytestmark = pytest.mark.timeout(600)
PROMPTS = [[2016, 11, 12, 13, 14], [2016] + list(range(300, 420, 3)), [2016, 7, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("fp8"), make_tiny="tiny-maverick-fp8", expert_workers=2)
    yield server


@pytest.fixture(scope="module")
def hf(live, tmp_path_factory):
    from transformers import Llama4ForCausalLM

    plain = dequantized_copy(live.model_dir, tmp_path_factory.mktemp("dequantized") / "ckpt")
    return Llama4ForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="eager").eval()


def test_the_yaml_args_write_an_fp8_checkpoint(tmp_path):
    config = prepare_args({"model": str(tmp_path / "m"), "make_tiny": "tiny-maverick-fp8"})
    import json

    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert config.make_tiny == "tiny-maverick-fp8" and qc["quant_method"] == "compressed-tensors"


def test_gang_greedy_equals_transformers_on_the_dequantized_weights(live, hf):
    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0.0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True})
    for choice, prompt in zip(out.choices, PROMPTS):
        assert choice.model_extra["token_ids"] == hf_greedy(hf, prompt, 12)


def test_expert_ranks_hold_fp8(live):
    from ray import serve

    ranks = serve.get_deployment_handle("gangs", "maverick").stats.remote().result()["ranks"]
    experts = [r for r in ranks if "expert_load" in r]
    assert len(experts) == 2
    # tiny-maverick: 2 MoE layers x 4 experts per rank x 3 x 256 x 256 weights, one byte each plus
    # a 4-byte scale per row; bf16 would take two bytes per weight
    numel = 2 * 4 * 3 * 256 * 256
    for r in experts:
        assert numel <= r["weight_bytes"] < 0.55 * 2 * numel, r["weight_bytes"]
