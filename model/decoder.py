"""The Llama 4 text decoder over a flat, unpadded batch of tokens from many sequences.

Parameter names follow the Hugging Face `Llama4ForCausalLM` state dict (`model.layers.N...`,
`lm_head.weight`), so checkpoints load without renaming.

Shape suffixes: T tokens, D hidden, V vocab, N rows whose logits are wanted.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import Attention, KVCache
from model.batch import AttentionMetadata
from model.config import Llama4Config
from model.layers import MLP, RMSNorm, RotaryEmbedding
from model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: Llama4Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.is_moe = config.is_moe(layer_idx)
        self.feed_forward = MoE(config) if self.is_moe else MLP(config.hidden_size,
                                                                   config.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_TD, positions_T, freqs_cis, meta, cache):
        x_TD = x_TD + self.self_attn(self.input_layernorm(x_TD), positions_T, freqs_cis, meta, cache)
        return x_TD + self.feed_forward(self.post_attention_layernorm(x_TD))

    def paused(self, x_TD, positions_T, freqs_cis, meta, cache):
        """`forward` as a generator that pauses once after an MoE layer's dispatch (`yield from` it)."""
        x_TD = x_TD + self.self_attn(self.input_layernorm(x_TD), positions_T, freqs_cis, meta, cache)
        if not self.is_moe:
            return x_TD + self.feed_forward(self.post_attention_layernorm(x_TD))
        begun = self.feed_forward.begin(self.post_attention_layernorm(x_TD))
        yield  # the tokens are with the experts
        return x_TD + self.feed_forward.end(begun)


class TextModel(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids_T, positions_T, meta, cache, embeds=None):
        x_TD = self.embed(input_ids_T, embeds)
        freqs_cis = self.rotary_emb.freqs_cis(positions_T)
        for layer in self.layers:
            x_TD = layer(x_TD, positions_T, freqs_cis, meta, cache)
        return self.norm(x_TD)

    def embed(self, input_ids_T, embeds=None):
        x_TD = self.embed_tokens(input_ids_T)
        if embeds is not None:  # (rows [R], vectors [R, D]): image features at their `<|patch|>` tokens
            x_TD = x_TD.index_copy(0, embeds[0], embeds[1].to(x_TD.dtype))
        return x_TD

    def forward_microbatches(self, microbatches: list[tuple], cache: KVCache) -> list[torch.Tensor]:
        """`forward` over several (input_ids_T, positions_T, meta, embeds) at once, ping-pong: while one
        micro-batch's tokens are with the routed experts, the next one computes. Each micro-batch runs
        its layers in order and pauses after every MoE dispatch, so all of them reach the MoE layers'
        collectives in the same order on every rank."""
        runs = [self._paused_at_moe(ids_T, positions_T, meta, cache, embeds)
                for ids_T, positions_T, meta, embeds in microbatches]
        outs: list[torch.Tensor | None] = [None] * len(runs)
        while any(out is None for out in outs):
            for i, run in enumerate(runs):
                if outs[i] is None:
                    try:
                        next(run)
                    except StopIteration as done:
                        outs[i] = done.value
        return outs

    def _paused_at_moe(self, input_ids_T, positions_T, meta, cache, embeds=None):
        x_TD = self.embed(input_ids_T, embeds)
        freqs_cis = self.rotary_emb.freqs_cis(positions_T)
        for layer in self.layers:
            x_TD = yield from layer.paused(x_TD, positions_T, freqs_cis, meta, cache)
        return self.norm(x_TD)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, meta: AttentionMetadata,
                cache: KVCache, embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final-normed hidden states [T, D]; call `logits` on the rows you sample from. `embeds` replaces
        the token embeddings of some rows (image features, `model.vision`)."""
        return self.model(input_ids_T, positions_T, meta, cache, embeds)

    @torch.inference_mode()
    def forward_microbatches(self, microbatches: list[tuple], cache: KVCache) -> list[torch.Tensor]:
        """Final-normed hidden states of each (input_ids_T, positions_T, meta, embeds), their MoE layers
        overlapped (`TextModel.forward_microbatches`)."""
        return self.model.forward_microbatches(microbatches, cache)

    @torch.inference_mode()
    def logits(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_ND)

    def moe_blocks(self) -> list[tuple[int, MoE]]:
        return [(i, layer.feed_forward) for i, layer in enumerate(self.model.layers) if layer.is_moe]
