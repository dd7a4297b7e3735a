"""The flat batch a forward pass consumes: tokens of many sequences, unpadded, plus KV-cache metadata.

Each layer belongs to a *group* named by its attention type (`chunked_attention` or
`full_attention`); layers of one group share cache slot numbering, so the metadata is built once per
group per step and reused by every layer of that group. Whoever owns the cache (a contiguous
per-sequence cache in tests, the paged allocator in the engine) describes each sequence by the slots
of its keys; this module turns that into gather indices and masks.

Shape suffixes: T tokens in the batch, B decode sequences, L keys, Q query tokens of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import CHUNKED, Llama4Config


@dataclass
class SequenceSlots:
    """One sequence's share of a step, as its cache owner sees it."""

    num_cached: int  # absolute position of the first new token
    num_new: int  # query tokens this step (0 allowed: the sequence is skipped)
    # group -> (kv_start, slots): cache slots of absolute positions [kv_start, num_cached + num_new)
    slots: dict[str, tuple[int, torch.Tensor]]


@dataclass
class PrefillSpan:
    start: int  # first token of the sequence in the flat batch
    end: int
    kv_slots_L: torch.Tensor
    mask_QL: torch.Tensor  # bool, True = visible


@dataclass
class DecodeBatch:
    token_index_B: torch.Tensor  # position of each single-token sequence in the flat batch
    kv_slots_BL: torch.Tensor  # padded with slot 0
    bias_BL: torch.Tensor  # additive mask: 0 on keys, -inf on padding
    lengths_B: torch.Tensor  # keys of each sequence (the unpadded prefix of its row)


@dataclass
class GroupMetadata:
    write_slots_T: torch.Tensor  # where each new token's K/V is stored
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode: DecodeBatch | None = None


@dataclass
class AttentionMetadata:
    groups: dict[str, GroupMetadata]
    num_tokens: int

    def to(self, device: torch.device | str) -> "AttentionMetadata":
        """Move every index and mask to the device the cache lives on (a no-op on CPU)."""
        if torch.device(device).type == "cpu":
            return self
        for gm in self.groups.values():
            gm.write_slots_T = gm.write_slots_T.to(device, non_blocking=True)
            for p in gm.prefills:
                p.kv_slots_L = p.kv_slots_L.to(device, non_blocking=True)
                p.mask_QL = p.mask_QL.to(device, non_blocking=True)
            if gm.decode is not None:
                d = gm.decode
                d.token_index_B, d.kv_slots_BL, d.bias_BL, d.lengths_B = (
                    t.to(device, non_blocking=True) for t in (d.token_index_B, d.kv_slots_BL, d.bias_BL, d.lengths_B))
        return self


def visible_mask(q_pos_Q: torch.Tensor, k_pos_L: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Causal mask; with `chunk`, also restricted to the fixed aligned chunk of each query."""
    mask_QL = k_pos_L[None, :] <= q_pos_Q[:, None]
    if chunk is not None:
        mask_QL &= (k_pos_L[None, :] // chunk) == (q_pos_Q[:, None] // chunk)
    return mask_QL


def build_metadata(config: Llama4Config, seqs: list[SequenceSlots]) -> tuple[torch.Tensor, AttentionMetadata]:
    """Return absolute positions [T] and the per-group attention metadata for a flat batch."""
    positions = [torch.arange(s.num_cached, s.num_cached + s.num_new) for s in seqs if s.num_new]
    positions_T = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    groups = {}
    for group in sorted(set(config.layer_types)):
        chunk = config.attention_chunk_size if group == CHUNKED else None
        groups[group] = _group_metadata(seqs, group, chunk)
    return positions_T, AttentionMetadata(groups=groups, num_tokens=positions_T.numel())


def _group_metadata(seqs: list[SequenceSlots], group: str, chunk: int | None) -> GroupMetadata:
    writes, prefills = [], []
    decode_tokens, decode_slots = [], []
    start = 0
    for s in seqs:
        if not s.num_new:
            continue
        kv_start, slots_L = s.slots[group]
        end_pos = s.num_cached + s.num_new
        if slots_L.numel() != end_pos - kv_start or kv_start > s.num_cached:
            raise ValueError(f"{group} slots cover [{kv_start}, {kv_start + slots_L.numel()}) "
                             f"but the step needs up to {end_pos} from {s.num_cached}")
        writes.append(slots_L[s.num_cached - kv_start:])
        # Keys before the query's own chunk are never visible: skip gathering them.
        first = kv_start if chunk is None else max(kv_start, s.num_cached // chunk * chunk)
        read_L = slots_L[first - kv_start:]
        if s.num_new == 1:
            decode_tokens.append(start)
            decode_slots.append(read_L)
        else:
            q_pos = torch.arange(s.num_cached, end_pos)
            k_pos = torch.arange(first, end_pos)
            prefills.append(PrefillSpan(start, start + s.num_new, read_L, visible_mask(q_pos, k_pos, chunk)))
        start += s.num_new
    write_T = torch.cat(writes) if writes else torch.zeros(0, dtype=torch.long)
    decode = None
    if decode_tokens:
        lengths = torch.tensor([x.numel() for x in decode_slots])
        slots_BL = torch.nn.utils.rnn.pad_sequence(decode_slots, batch_first=True, padding_value=0)
        pad_BL = torch.arange(slots_BL.shape[1])[None, :] >= lengths[:, None]
        bias_BL = torch.zeros(pad_BL.shape).masked_fill_(pad_BL, float("-inf"))
        decode = DecodeBatch(torch.tensor(decode_tokens), slots_BL, bias_BL, lengths)
    return GroupMetadata(write_T, prefills, decode)
