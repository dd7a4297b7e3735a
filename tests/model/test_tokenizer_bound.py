"""A prompt too long for the context is known from its length alone, and never wrongly: the bound
`Tokenizer.surely_longer_than` uses must hold for every text the tokenizer can meet."""

import json
import random

import pytest

from model.tiny import make_tiny
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny-maverick", seed=1))


def _texts(tokenizer: Tokenizer) -> list[str]:
    rng = random.Random(7)
    vocab = list(json.loads(tokenizer.to_json())["model"]["vocab"])
    longest = max(vocab, key=len)
    return [
        " ".join(rng.choice(["a", "the", "fox", "é", "日本", "🙂", "\n", "  "]) for _ in range(400)),
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(2000)),
        "x" * 5000,
        longest * 300,  # the entries that cover the most text, back to back
        "<|begin_of_text|>" * 200,  # special tokens spelled out in the text
    ]


def test_the_bound_never_refuses_a_prompt_that_fits(tokenizer):
    assert tokenizer.max_chars_per_token is not None  # byte-level BPE, no normalizer
    for text in _texts(tokenizer):
        n = len(tokenizer.encode(text))
        for budget in (n, n + 1, 2 * n):  # budgets the text fits in
            assert not tokenizer.surely_longer_than(text, budget), (text[:40], n, budget)
        assert len(text) <= n * tokenizer.max_chars_per_token


def test_a_megabyte_prompt_is_refused_from_its_length(tokenizer):
    text = "hello world " * 90_000
    assert tokenizer.surely_longer_than(text, 4096)
    assert len(tokenizer.encode(text)) > 4096  # and it is indeed too long
