"""A small byte-level BPE tokenizer with Llama 4's special tokens and chat template, for tiny checkpoints.

The BPE is trained here on Python's bundled pydoc text (deterministic for a given Python), with the
o200k pre-tokenisation regex Llama 4 uses. Special tokens keep Llama 4's order and are appended
right after the BPE vocabulary, as Llama 4 appends them after its 200000 BPE ranks.
"""

from __future__ import annotations

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
# System text is trimmed; list content renders text parts and <|image|> for image parts;
# tool results use the `ipython` role.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- for message in messages -%}
    {%- set role = 'ipython' if message['role'] in ('tool', 'ipython') else message['role'] -%}
    {{- '<|header_start|>' + role + '<|header_end|>\n\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim if role == 'system' else message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- elif part['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|eot|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|header_start|>assistant<|header_end|>\n\n' -}}
{%- endif -%}
"""


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(vocab_size: int) -> tuple[Tokenizer, dict[str, int]]:
    """BPE of at most `vocab_size - len(SPECIAL_TOKENS)` entries, then the special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, ids[bos])])
    return tok, ids
