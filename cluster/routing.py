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


def _score(key: bytes, target: int) -> bytes:
    return hashlib.blake2b(key + target.to_bytes(4, "little"), digest_size=8).digest()


def pick(key: bytes | None, loads: Sequence[int], available: Sequence[int] | None = None,
         slack: int = DEFAULT_SLACK) -> int:
    """The target index for a request with affinity `key`, given each target's requests in flight."""
    candidates = list(range(len(loads))) if available is None else list(available)
    if not candidates:
        raise ValueError("no target available")
    least = min(candidates, key=lambda i: (loads[i], i))
    if key is None:
        return least
    preferred = max(candidates, key=lambda i: _score(key, i))
    if loads[preferred] > loads[least] + slack and loads[preferred] > 1.5 * loads[least]:
        return least  # much busier: losing a prefix hit costs less than queueing behind it
    return preferred
