"""`maverick make-tiny`: a random-weight checkpoint in the real Hugging Face Llama 4 layout.

What it writes, as the Hub repos have it: a `Llama4ForConditionalGeneration` `config.json` (nested
`text_config` plus a tiny `vision_config`, so `transformers` does not build a full-size vision
tower), sharded safetensors with `language_model.` keys and an index, `generation_config.json`, a
byte-level BPE `tokenizer.json` trained here carrying the Llama 4 special tokens (ids remapped into
the small vocab) and `tokenizer_config.json` with the Llama 4 chat template.
`--layout causal` writes a text-only `Llama4ForCausalLM` checkpoint instead. `--fp8` writes Meta's FP8
layout (`model.quant`): per-channel E4M3 weights with `weight_scale` for every Linear not in the
ignore list, routed experts as per-expert keys, the compressed-tensors `quantization_config`.
`--router-skew S` sends most tokens to a hot pair of experts per MoE layer (`model.router_skew`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import Llama4Config, RopeScaling
from model.router_skew import skew_routers
from model.tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

TINY_PRESETS: dict[str, dict] = {
    "tiny-maverick": dict(
        vocab_size=2048, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False,
        attention_chunk_size=128, max_position_embeddings=4096,
    ),
    "tiny-scout": dict(
        vocab_size=2048, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
        attention_chunk_size=128, max_position_embeddings=4096,
        rope_scaling=RopeScaling(rope_type="llama3", factor=16.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=256),
    ),
    # Maverick's real structure at tiny widths (88M parameters): 48 layers, MoE every other layer,
    # 128 routed experts + the shared one, 40 query / 8 KV heads, three chunked RoPE layers then a
    # global NoPE one; for gangs as deep and as wide as the real model's (2 attention + 16 expert ranks).
    "maverick-full-depth": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=64, intermediate_size_mlp=128,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=16,
        num_local_experts=128, interleave_moe_layer_step=2, no_rope_layer_interval=4, use_qk_norm=False,
        attention_chunk_size=128, max_position_embeddings=4096,
    ),
    # The benchmark shape of shared/PEERS.md (133M parameters).
    "bench": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_local_experts=16, interleave_moe_layer_step=2, use_qk_norm=False,
        attention_chunk_size=256, max_position_embeddings=4096,
    ),
}

# 16-px tiles of 2-px patches: 64 patches, 16 `<|patch|>` tokens per tile after the pixel shuffle
TINY_VISION = dict(hidden_size=32, image_size=16, patch_size=2, num_attention_heads=4, num_hidden_layers=1,
                   intermediate_size=128, vision_output_dim=32, projector_input_dim=32,
                   projector_output_dim=32, pixel_shuffle_ratio=0.5, hidden_act="gelu", norm_eps=1e-5,
                   num_channels=3, rope_theta=10000.0, model_type="llama4_vision_model")


def text_weight_shapes(c: Llama4Config) -> dict[str, tuple[int, ...]]:
    """Every text tensor of a `Llama4ForCausalLM` checkpoint with its shape."""
    d, hd = c.hidden_size, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, d)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (c.num_attention_heads * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (c.num_key_value_heads * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (c.num_key_value_heads * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, c.num_attention_heads * hd)
        if c.is_moe(i):
            f, e = c.intermediate_size, c.num_experts
            shapes[p + "feed_forward.router.weight"] = (e, d)
            shapes[p + "feed_forward.experts.gate_up_proj"] = (e, d, 2 * f)
            shapes[p + "feed_forward.experts.down_proj"] = (e, f, d)
            for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                shapes[p + f"feed_forward.shared_expert.{name}.weight"] = shape
        else:
            f = c.intermediate_size_mlp
            for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                shapes[p + f"feed_forward.{name}.weight"] = shape
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def vision_weight_shapes(text_hidden: int, v: dict) -> dict[str, tuple[int, ...]]:
    h, inter, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.class_embedding": (h,),
        "vision_model.positional_embedding_vlm": ((v["image_size"] // p) ** 2 + 1, h),
        "vision_model.patch_embedding.linear.weight": (h, v["num_channels"] * p * p),
    }
    for ln in ("layernorm_pre", "layernorm_post"):
        shapes[f"vision_model.{ln}.weight"] = shapes[f"vision_model.{ln}.bias"] = (h,)
    for j in range(v["num_hidden_layers"]):
        p_ = f"vision_model.model.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p_ + f"self_attn.{proj}.weight"], shapes[p_ + f"self_attn.{proj}.bias"] = (h, h), (h,)
        shapes[p_ + "mlp.fc1.weight"], shapes[p_ + "mlp.fc1.bias"] = (inter, h), (inter,)
        shapes[p_ + "mlp.fc2.weight"], shapes[p_ + "mlp.fc2.bias"] = (h, inter), (h,)
        for ln in ("input_layernorm", "post_attention_layernorm"):
            shapes[p_ + f"{ln}.weight"] = shapes[p_ + f"{ln}.bias"] = (h,)
    shapes["vision_model.vision_adapter.mlp.fc1.weight"] = (v["projector_input_dim"], inter)
    shapes["vision_model.vision_adapter.mlp.fc2.weight"] = (v["projector_output_dim"], v["projector_input_dim"])
    shapes["multi_modal_projector.linear_1.weight"] = (text_hidden, v["vision_output_dim"])
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scaled so activations keep unit size and logits are well separated (no near-ties in greedy)."""
    if "norm" in name and name.endswith(".weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias") or name.endswith("class_embedding"):
        return 0.02 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    fan_in = shape[-2] if name.endswith(("gate_up_proj", "experts.down_proj")) else shape[-1]
    gain = 3.0 if name.endswith(("router.weight", "lm_head.weight")) else 1.0
    return gain / math.sqrt(fan_in) * torch.randn(shape, generator=gen)


def fp8_tensors(tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Quantize every Linear the FP8 scheme covers (per output channel, from the fp32 values); routed
    experts become per-expert keys."""
    from model.quant import Fp8Scheme, DEFAULT_IGNORE, quantize_rows

    scheme = Fp8Scheme(DEFAULT_IGNORE, True)
    out: dict[str, torch.Tensor] = {}

    def linear(key: str, w_OI: torch.Tensor) -> None:
        q, scale = quantize_rows(w_OI)
        out[key], out[key + "_scale"] = q, scale.to(dtype)

    for key, t in tensors.items():
        module = key.removeprefix(prefix).rsplit(".", 1)[0]
        if key.endswith("experts.gate_up_proj"):  # [E, D, 2F] -> per expert gate/up [F, D]
            width = t.shape[-1] // 2
            for e in range(t.shape[0]):
                linear(f"{key[:-len('gate_up_proj')]}{e}.gate_proj.weight", t[e, :, :width].t())
                linear(f"{key[:-len('gate_up_proj')]}{e}.up_proj.weight", t[e, :, width:].t())
        elif key.endswith("experts.down_proj"):  # [E, F, D] -> per expert [D, F]
            for e in range(t.shape[0]):
                linear(f"{key[:-len('down_proj')]}{e}.down_proj.weight", t[e].t())
        elif key.endswith("_proj.weight") and not key.startswith(("vision_model.", "multi_modal_projector.")) \
                and scheme.quantized(module):
            linear(key, t)
        else:
            out[key] = t.to(dtype)
    return out


def make_tiny(out_dir: str | Path, preset: str = "tiny-maverick", seed: int = 0, layout: str = "conditional",
              dtype: torch.dtype = torch.bfloat16, num_shards: int = 2, fp8: bool = False,
              vocab_size: int | None = None, router_skew: float = 0.0) -> Path:
    """`vocab_size` overrides the preset's (benchmarks of per-token vocabulary work use Maverick's 202048).
    `router_skew` > 0 sends most tokens to a hot pair of experts (`model.router_skew`)."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(TINY_PRESETS)}")
    if layout not in ("conditional", "causal"):
        raise ValueError("layout must be 'conditional' or 'causal'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = {**TINY_PRESETS[preset], **({"vocab_size": vocab_size} if vocab_size else {})}
    vocab = shape["vocab_size"]
    tokenizer, special_ids = train_tokenizer(vocab)
    ids = {name: special_ids[name] for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom|>",
                                                   "<|eot|>", "<|finetune_right_pad|>")}
    eos = [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    config = Llama4Config(**shape, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos,
                          pad_token_id=ids["<|finetune_right_pad|>"], torch_dtype=str(dtype).split(".")[-1])
    gen = torch.Generator().manual_seed(seed)
    prefix = "language_model." if layout == "conditional" else ""
    tensors = {prefix + k: random_tensor(k, s, gen) for k, s in text_weight_shapes(config).items()}
    tensors = skew_routers(tensors, router_skew, seed)
    if layout == "conditional":
        vshapes = vision_weight_shapes(config.hidden_size, TINY_VISION)
        tensors.update({k: random_tensor(k, s, gen) for k, s in vshapes.items()})
    tensors = fp8_tensors(tensors, prefix, dtype) if fp8 else {k: t.to(dtype) for k, t in tensors.items()}
    _write_shards(out, tensors, num_shards)
    hf_config = _hf_config(config, layout, special_ids)
    if fp8:
        from model.quant import fp8_quantization_config

        hf_config["quantization_config"] = fp8_quantization_config()
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id,
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "transformers_version": "5.24.0"})
    if layout == "conditional":
        _write_json(out / "preprocessor_config.json", preprocessor_config(TINY_VISION))
        _write_json(out / "processor_config.json", {
            "processor_class": "Llama4Processor", "patch_size": TINY_VISION["patch_size"],
            "pixel_shuffle_ratio": TINY_VISION["pixel_shuffle_ratio"]})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>", "pad_token": "<|finetune_right_pad|>", "model_max_length":
        config.max_position_embeddings, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"]})
    return out


def preprocessor_config(vision: dict, max_patches: int = 16) -> dict:
    """`Llama4ImageProcessor`'s settings as the Hub repos ship them, with this tower's tile size."""
    side = vision["image_size"]
    return {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor",
            "size": {"height": side, "width": side}, "max_patches": max_patches, "resize_to_max_canvas": False,
            "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_convert_rgb": True}


def _hf_config(config: Llama4Config, layout: str, special_ids: dict[str, int]) -> dict:
    text = config.to_hf_text_dict()
    text["rope_scaling"] = (dataclasses.asdict(config.rope_scaling)
                            if config.rope_scaling.rope_type != "default" else None)
    if layout == "causal":
        return {"architectures": ["Llama4ForCausalLM"], **text}
    return {
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "text_config": text, "vision_config": dict(TINY_VISION),
        "boi_token_index": special_ids["<|image_start|>"], "eoi_token_index": special_ids["<|image_end|>"],
        "image_token_index": special_ids["<|patch|>"], "tie_word_embeddings": False,
        "torch_dtype": config.torch_dtype,
    }


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    target = total / num_shards
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > target * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                       "weight_map": weight_map})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


__all__ = ["make_tiny", "TINY_PRESETS", "SPECIAL_TOKENS", "text_weight_shapes"]
