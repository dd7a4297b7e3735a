"""The reference implementation (transformers) and tiny checkpoints written by it, shared by tests."""

from __future__ import annotations

from pathlib import Path

import torch

REFERENCE_TRANSFORMERS = "5.24.0"  # the one version the oracle tests are pinned to (pyproject.toml)

# Small enough to run in milliseconds, with short chunks and floor_scale so that chunked attention
# and temperature tuning both take effect within a few dozen tokens.
SCOUT_LIKE = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4,
    num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=2,
    attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1,
    rms_norm_eps=1e-5, max_position_embeddings=512, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
    tie_word_embeddings=False, pad_token_id=None, bos_token_id=1, eos_token_id=2,
)
MAVERICK_LIKE = dict(
    SCOUT_LIKE, num_local_experts=8, interleave_moe_layer_step=2, no_rope_layer_interval=4,
    use_qk_norm=False, rope_scaling=None, attention_chunk_size=16, floor_scale=8,
)


def hf_text_config(base: dict, **overrides):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(**{**base, **overrides}, attn_implementation="eager")


def hf_model(config, seed: int = 0):
    """A `Llama4ForCausalLM` with weights large enough that logits are well separated."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config).eval().float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "router" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
    return model


def save_conditional(text_model, out: Path) -> Path:
    """Save as the Hub layout: Llama4ForConditionalGeneration with a tiny vision tower."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, image_size=8, patch_size=2, num_attention_heads=4, num_hidden_layers=1,
                  intermediate_size=128, vision_output_dim=32, projector_input_dim=32,
                  projector_output_dim=32, pixel_shuffle_ratio=0.5)
    config = Llama4Config(text_config=text_model.config.to_dict(), vision_config=vision)
    full = Llama4ForConditionalGeneration(config).eval()
    full.language_model.load_state_dict(text_model.state_dict())
    full.save_pretrained(out)
    return out


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step: the definition, no cache involved."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def dequantized_copy(src: Path, dst: Path) -> Path:
    """The FP8 checkpoint's weights as fp32 (W = q * scale), fused experts, no quantization_config."""
    import json
    import shutil

    from safetensors.torch import save_file

    from model.checkpoint import CheckpointReader
    from model.quant import dequantize

    dst.mkdir(parents=True, exist_ok=True)
    reader = CheckpointReader(src)
    tensors = {k: reader.read(k) for k in reader.keys()}
    out, experts = {}, {}
    for key, t in tensors.items():
        if key.endswith("weight_scale"):
            continue
        if key + "_scale" in tensors:
            t = dequantize(t, tensors[key + "_scale"], torch.float32)
        if ".experts." in key:  # ...experts.{e}.{gate,up,down}_proj.weight
            head, e, part = key.rsplit(".", 3)[0], int(key.rsplit(".", 3)[1]), key.rsplit(".", 3)[2]
            experts.setdefault(head, {}).setdefault(e, {})[part] = t
            continue
        out[key] = t.float()
    for head, by_e in experts.items():
        ids = sorted(by_e)
        out[head + ".gate_up_proj"] = torch.stack([torch.cat([by_e[e]["gate_proj"].t(), by_e[e]["up_proj"].t()], -1)
                                                   for e in ids])
        out[head + ".down_proj"] = torch.stack([by_e[e]["down_proj"].t() for e in ids])
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = config["text_config"]["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst
