"""Prefix affinity balanced against load: where a request goes, among gangs or among a gang's
attention workers.

A prompt with at least `prefix_tokens` tokens has an affinity key (a hash of exactly that many first
tokens, so prompts sharing a long prefix share a key whatever their lengths). Rendezvous hashing maps
the key to a preferred target among those available, stable when other targets come and go; the
preferred one is taken unless it is much busier than the least busy (by more than `slack` requests
and by half again). Prompts without a key go to the least busy target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_PREFIX_TOKENS = 64
DEFAULT_SLACK = 4


def affinity_key(prompt_token_ids: Sequence[int], prefix_tokens: int = DEFAULT_PREFIX_TOKENS) -> bytes | None:
    if len(prompt_token_ids) < prefix_tokens:
        return None
    data = b"".join(int(t).to_bytes(4, "little", signed=True) for t in prompt_token_ids[:prefix_tokens])
    return hashlib.blake2b(data, digest_size=16).digest()


def _score(key: bytes, target: int | str) -> bytes:
    name = target.encode() if isinstance(target, str) else target.to_bytes(4, "little")
    return hashlib.blake2b(key + name, digest_size=8).digest()


def pick(key: bytes | None, loads: Sequence[int], available: Sequence[int] | None = None,
         slack: int = DEFAULT_SLACK, names: Sequence[str] | None = None) -> int:
    """The target index for a request with affinity `key`, given each target's requests in flight.
    `names`: each target's lasting identity (a gang's id), so a key keeps its target when others come
    or go; without them a target is its index (a gang's fixed attention workers)."""
    candidates = list(range(len(loads))) if available is None else list(available)
    if not candidates:
        raise ValueError("no target available")
    least = min(candidates, key=lambda i: (loads[i], i))
    if key is None:
        return least
    preferred = max(candidates, key=lambda i: _score(key, names[i] if names is not None else i))
    if loads[preferred] > loads[least] + slack and loads[preferred] > 1.5 * loads[least]:
        return least  # much busier: losing a prefix hit costs less than queueing behind it
    return preferred
