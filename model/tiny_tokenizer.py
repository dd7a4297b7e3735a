"""A small byte-level BPE tokenizer with Llama 4's special tokens and chat template, for tiny checkpoints.

The BPE is trained here on Python's bundled pydoc text (deterministic for a given Python), with the
o200k pre-tokenisation regex Llama 4 uses. Special tokens keep Llama 4's order and are appended
right after the BPE vocabulary, as Llama 4 appends them after its 200000 BPE ranks.
"""

from __future__ import annotations

import json
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama 4's pre-tokenisation split (o200k); a fact of the format, not a tuning choice.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# In Llama 4's order (ids 200000.. there); reserved runs are shortened to keep the vocab small.
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>",
    *[f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)],
    "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
    "<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
    "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
    *[f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)],
    "<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>",
]

# The Llama 4 chat format: <|begin_of_text|>, then per message
# <|header_start|>ROLE<|header_end|>\n\nCONTENT<|eot|>, then the assistant header when asked.
# System text is trimmed; list content renders text parts and <|image|> for image parts.
# With tools (Meta's Llama 4 tool layout): the system turn carries the instruction to answer with a
# pythonic list of calls and the tools' JSON (a default instruction when no system message is given);
# an assistant turn with tool calls renders them as that list and ends in <|eom|>, as do tool results,
# which use the `ipython` role.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- if tools -%}
    {%- if messages and messages[0]['role'] == 'system' -%}
        {%- set first = messages[0]['content'] -%}
        {%- set system_text = (first if first is string else first[0]['text']) | trim -%}
        {%- set messages = messages[1:] -%}
    {%- else -%}
        {%- set system_text = 'You are a helpful assistant. You may call functions to answer.' -%}
    {%- endif -%}
    {{- '<|header_start|>system<|header_end|>\n\n' + system_text + '\n\n' -}}
    {{- 'If you call functions, reply with nothing but a Python list of calls: ' -}}
    {{- '[func_name1(param1=value1, param2=value2), func_name2(...)]\n' -}}
    {{- 'Here is a list of functions in JSON format that you can invoke:\n' -}}
    {{- tools | tojson(indent=4) -}}
    {{- '<|eot|>' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set role = 'ipython' if message['role'] in ('tool', 'ipython') else message['role'] -%}
    {{- '<|header_start|>' + role + '<|header_end|>\n\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim if role == 'system' else message['content'] -}}
    {%- elif message['content'] is not none -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- elif part['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message['tool_calls'] -%}
        {{- '[' -}}
        {%- for call in message['tool_calls'] -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {{- fn['name'] + '(' -}}
            {%- for name, value in (fn['arguments'] or {}).items() -%}
                {{- name + '=' + (value | tojson) -}}{{- ', ' if not loop.last -}}
            {%- endfor -%}
            {{- ')' -}}{{- ', ' if not loop.last -}}
        {%- endfor -%}
        {{- ']<|eom|>' -}}
    {%- elif role == 'ipython' -%}
        {{- '<|eom|>' -}}
    {%- else -%}
        {{- '<|eot|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|header_start|>assistant<|header_end|>\n\n' -}}
{%- endif -%}
"""


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# The pydoc corpus yields about this many BPE entries; larger vocabularies are filled synthetically.
TRAINED_LIMIT = 16384


def train_tokenizer(vocab_size: int) -> tuple[Tokenizer, dict[str, int]]:
    """BPE of `vocab_size - len(SPECIAL_TOKENS)` entries, then the special tokens. Past what the corpus
    can train, merges of trained tokens fill the vocabulary (`_extend`): the size, not the quality,
    is what a benchmark of per-token vocabulary work (grammar masks, lm_head) needs."""
    bpe_size = vocab_size - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_size, TRAINED_LIMIT), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() < bpe_size:
        tok = _extend(tok, bpe_size)
    tok.add_special_tokens(SPECIAL_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, ids[bos])])
    return tok, ids


def _extend(tok: Tokenizer, bpe_size: int) -> Tokenizer:
    """The trained BPE grown to `bpe_size` entries by merges of two existing tokens (lowest priority, so
    every trained merge still applies first), drawn deterministically; pieces up to 16 characters,
    like the long words of a real 200k vocabulary."""
    state = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list = state["model"]["merges"]
    pieces = sorted(vocab, key=vocab.get)
    words = [p for p in pieces if len(p) > 1]  # trained multi-byte pieces: word-like material
    rng = random.Random(0)
    while len(vocab) < bpe_size:
        a = rng.choice(words if rng.random() < 0.8 else pieces)
        b = rng.choice(words)
        if len(a) + len(b) > 16 or (a + b) in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append([a, b])
        pieces.append(a + b)
    return Tokenizer.from_str(json.dumps(state))
