"""FP8 checkpoints in Meta's layout: our FP8 model equals our model on the same weights dequantized to
fp32, which equals transformers; storage is FP8; bad quantization configs fail naming the field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.batch import build_metadata
from model.checkpoint import CheckpointError
from model.generate import ContiguousCache
from model.loader import load_pretrained
from model.quant import FP8, Fp8Linear, Fp8RoutedExperts, QuantConfigError, weight_bytes
from model.tiny import make_tiny
from tests.oracle import dequantized_copy, hf_greedy, hf_logits

PROMPTS = [[2016, 11, 12, 13, 14], [2016] + list(range(300, 360, 3)), [2016, 7, 7, 7, 7, 7]]


@torch.no_grad()
def prefill_logits(model, prompt):
    cache = ContiguousCache(model, 1, 64)
    positions, meta = build_metadata(model.config, [cache.slots(0, 0, len(prompt))])
    return model.logits(model(torch.tensor(prompt), positions, meta, cache.kv))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    fp8 = make_tiny(root / "fp8", "tiny-maverick", seed=3, fp8=True)
    return fp8, dequantized_copy(fp8, root / "dequantized")


def test_storage_is_fp8_where_the_scheme_says(checkpoints):
    fp8, _ = checkpoints
    model = load_pretrained(fp8)
    moe, dense = model.model.layers[1].feed_forward, model.model.layers[0].feed_forward
    assert isinstance(moe.experts, Fp8RoutedExperts) and moe.experts.gate_up_weight.dtype == FP8
    assert isinstance(moe.shared_expert.down_proj, Fp8Linear) and isinstance(dense.gate_proj, Fp8Linear)
    assert type(moe.router) is torch.nn.Linear and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear  # the ignore list keeps these in the working dtype
    # expert weights: one byte each plus a 4-byte scale per row, about half of bf16's two bytes
    experts_bytes = weight_bytes(moe.experts)
    numel = moe.experts.gate_up_weight.numel() + moe.experts.down_weight.numel()
    assert experts_bytes < 0.55 * 2 * numel


def test_fp8_model_equals_the_dequantized_model_and_transformers(checkpoints):
    from transformers import Llama4ForCausalLM

    fp8, plain = checkpoints
    ours_fp8, ours_plain = load_pretrained(fp8), load_pretrained(plain)
    hf = Llama4ForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="eager").eval()
    for prompt in PROMPTS:
        a, b = prefill_logits(ours_fp8, prompt), prefill_logits(ours_plain, prompt)
        assert (a - b).abs().max() < 1e-4
        assert (b - hf_logits(hf, prompt)).abs().max() < 1e-4


def test_fp8_engine_greedy_equals_transformers_on_the_dequantized_weights(checkpoints):
    from transformers import Llama4ForCausalLM

    from workers.llm import LLM
    from workers.sampling_params import SamplingParams

    fp8, plain = checkpoints
    hf = Llama4ForCausalLM.from_pretrained(plain, dtype=torch.float32, attn_implementation="eager").eval()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = LLM(fp8, skip_tokenizer_init=True).generate(PROMPTS, params)
    for out, prompt in zip(outs, PROMPTS):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_transformers_reads_our_fp8_layout_with_compressed_tensors(tmp_path):
    """transformers' own compressed-tensors support loads `make-tiny --fp8`. It dequantizes in the
    scale's dtype, so with fp32 scales its weights are exactly q * scale, as ours are (with bf16
    scales it rounds each product to bf16; we multiply in fp32, as an FP8 GEMM does)."""
    from transformers import CompressedTensorsConfig, Llama4ForConditionalGeneration

    from workers.llm import LLM
    from workers.sampling_params import SamplingParams

    ckpt = make_tiny(tmp_path / "fp8", "tiny-maverick", seed=4, fp8=True, dtype=torch.float32)
    hf = Llama4ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager",
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval().language_model
    assert type(hf.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    ours = load_pretrained(ckpt)
    for prompt in PROMPTS:
        assert (prefill_logits(ours, prompt) - hf_logits(hf, prompt)).abs().max() < 1e-4
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for out, prompt in zip(LLM(ckpt, skip_tokenizer_init=True).generate(PROMPTS, params), PROMPTS):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def _edit_config(ckpt, edit):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit, field", [
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=128),
     "quantization_config.config_groups.group_0.weights.strategy"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4), "weights.num_bits"),
    (lambda qc: qc.update(quant_method="gptq"), "quantization_config.quant_method"),
    (lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(strategy="tensor", dynamic=False),
     "input_activations.strategy"),
])
def test_unsupported_schemes_are_refused_naming_the_field(checkpoints, tmp_path, edit, field):
    fp8, _ = checkpoints
    bad = shutil.copytree(fp8, tmp_path / "bad")
    _edit_config(bad, edit)
    with pytest.raises(QuantConfigError, match=field.replace(".", r"\.")):
        load_pretrained(bad)


def _rewrite_tensor(ckpt, key, change):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][key]
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if key not in tensors:
        del index["weight_map"][key]
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("key, change, message", [
    ("language_model.model.layers.1.feed_forward.experts.3.up_proj.weight_scale",
     lambda t, k: t.pop(k), "experts.3.up_proj.weight_scale"),
    ("language_model.model.layers.0.feed_forward.down_proj.weight_scale",
     lambda t, k: t.pop(k), "layers.0.feed_forward.down_proj.weight_scale"),
    ("language_model.model.layers.1.feed_forward.shared_expert.gate_proj.weight_scale",
     lambda t, k: t.__setitem__(k, t[k][:, 0].contiguous()), "shared_expert.gate_proj.weight_scale.*shape"),
    ("language_model.model.layers.0.feed_forward.up_proj.weight",
     lambda t, k: t.__setitem__(k, t[k].to(torch.bfloat16)), "feed_forward.up_proj.weight.*float8"),
])
def test_broken_fp8_tensors_fail_naming_the_key(checkpoints, tmp_path, key, change, message):
    fp8, _ = checkpoints
    bad = shutil.copytree(fp8, tmp_path / "bad")
    _rewrite_tensor(bad, key, lambda tensors: change(tensors, key))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(bad)
