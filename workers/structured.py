"""Structured outputs: a grammar per request constrains which tokens it may sample (llguidance).

A `GrammarSpec` is what a request asks for (a JSON schema, any JSON object, a regex, a choice of
strings, or a Lark / GBNF grammar), in a canonical form that names its cache entry. `Grammars` turns
specs into llguidance matchers for one tokenizer: each spec is compiled once (a pristine matcher
whose first mask is computed, so its lexer is warm) and every request gets a copy. Compiles run on
the `Grammars` thread, never on an event loop or the wave thread: a schema that takes long to
compile delays only its own request. `prefetch` starts filling the next step's bitmasks (in parallel,
outside the GIL, on the mask thread) while the forward pass runs: a matcher's next mask depends only
on the tokens it has consumed. `apply_masks` then sets every forbidden logit to -inf, filling on the
spot only the rows nothing prefetched (a request's first token).

llguidance over xgrammar: measured on a 202k vocabulary (NOTES.md), its masks cost ~8x less per token
and it needs neither transformers nor triton at run time.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import llguidance
import llguidance.numpy as llg_numpy  # not .torch: its import pulls in torch._dynamo for a kernel unused here (~2 s)
import numpy as np
import torch

from workers.errors import InvalidRequest

# One whitespace layout, as json.dumps writes it: a random or weak model cannot loop on free
# whitespace between tokens, and outputs stay byte-comparable.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


@dataclass(frozen=True)
class GrammarSpec:
    """`kind`: json, json_object, regex, choice or grammar; `text` the schema as canonical JSON, the regex, the choices as a JSON
    list, or the grammar's text. `param` names the request field it came from, for errors."""

    kind: str
    text: str
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: dict | str, param: str = "response_format") -> "GrammarSpec":
        try:
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise InvalidRequest(f"{param}: the JSON schema is not valid JSON: {exc}", param=param) from None
            if not isinstance(schema, dict):
                raise InvalidRequest(f"{param}: a JSON schema must be an object", param=param)
            # canonical up to whitespace; key order stays: it is the order properties are written in
            return cls("json", json.dumps(schema, separators=(",", ":")), param)
        except RecursionError:  # a hostile schema of thousands of nested brackets: the client's error
            raise InvalidRequest(f"{param}: the JSON schema is nested too deeply", param=param) from None

    @classmethod
    def choice(cls, options: list, param: str = "structured_outputs.choice") -> "GrammarSpec":
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidRequest(f"{param} must be a non-empty list of non-empty strings", param=param)
        return cls("choice", json.dumps(list(options)), param)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.text

    def llguidance_grammar(self) -> str:
        """The llguidance grammar text; the matcher built from it reports what is wrong."""
        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(self.text, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(ascii_digits(self.text))
        if self.kind == "choice":  # JSON string literals are Lark string literals
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(o) for o in json.loads(self.text)))
        if self.kind == "grammar":
            return _lark_or_gbnf(self.text)
        raise InvalidRequest(f"unknown grammar kind {self.kind!r}", param=self.param)


def ascii_digits(regex: str) -> str:
    """`\\d` as [0-9], as vLLM's xgrammar and JSON Schema read it: llguidance's regexes are Unicode, so
    its `\\d` also admits Arabic-Indic or NKo digits, which no client parsing numbers expects."""
    out, i, class_start = [], 0, None  # class_start: where the open class's members begin
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            in_class = class_start is not None
            out.append(("0-9" if in_class else "[0-9]") if nxt == "d" else
                       "[^0-9]" if nxt == "D" and not in_class else c + nxt)
            i += 2
            continue
        if c == "[" and class_start is None:
            class_start = i + 2 if regex[i + 1:i + 2] == "^" else i + 1
        elif c == "]" and class_start is not None and i > class_start:  # a leading ] is a member
            class_start = None
        out.append(c)
        i += 1
    return "".join(out)


def _lark_or_gbnf(text: str) -> str:
    """vLLM takes Lark or GBNF under `grammar`: Lark first, then GBNF converted to Lark."""
    lark = llguidance.LLMatcher.grammar_from_lark(text)
    if not llguidance.LLMatcher.validate_grammar(lark):
        return lark
    try:
        from llguidance.gbnf_to_lark import any_to_lark

        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(text))
    except Exception:  # noqa: BLE001 - neither form: report the Lark error
        return lark


class Matcher:
    """One choice's grammar state. `eos_ids`: every end-of-sequence id of the model; llguidance knows one,
    so the others are allowed exactly where it is, and consumed as it."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: tuple[int, ...]):
        self.inner, self.eos_ids = matcher, eos_ids
        self.consumed = 0
        # (mask job, this matcher's row in it, `consumed` when it started): the next mask, prefetched
        self.prefetched: tuple[Future, int, int] | None = None

    def advance(self, token: int) -> None:
        if self.prefetched is not None:  # never consume while the mask thread reads this state
            wait([self.prefetched[0]])
            self.prefetched = None
        if token in self.eos_ids:
            token = self.eos_ids[0]
        if not self.inner.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.inner.get_error()}")
        self.consumed += 1

    def take_prefetched(self) -> np.ndarray | None:
        """The prefetched forbidden-token row of this state, or None when there is none for it."""
        job = self.prefetched
        self.prefetched = None
        if job is None or job[2] != self.consumed:
            return None
        return job[0].result()[job[1]]


class Grammars:
    """Compiles specs for one tokenizer, on its own thread, caching each canonical spec once."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.vocab_size = vocab_size
        self.eos_ids = tuple(eos_ids)
        self._tokenizer_json = tokenizer_json
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on the thread: ~1.3 s at 202k tokens
        # only the grammar thread touches the cache
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._executor: llguidance.LLExecutor | None = None
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        self._thread.submit(self._llg_tokenizer)  # now, not in the first structured request's time

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_ids: list[int]) -> "Grammars":
        """For a `model.tokenizer.Tokenizer`; its own EOS goes first (the one llguidance is told of)."""
        named = tokenizer.token_to_id(tokenizer.special_tokens.get("eos_token") or "")
        ordered = sorted(eos_ids, key=lambda t: t != named) or ([named] if named is not None else [0])
        return cls(tokenizer.to_json(), vocab_size, ordered)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                     eos_token=self.eos_ids[0])
        return self._tokenizer

    def _compiled(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The pristine matcher of `spec` (on the grammar thread); InvalidRequest naming the problem."""
        cached = self._cache.get(spec.key)
        if cached is not None:
            self._cache.move_to_end(spec.key)
            return cached
        try:
            grammar = spec.llguidance_grammar()
        except ValueError as exc:
            raise InvalidRequest(f"{spec.param}: {exc}", param=spec.param) from None
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"{spec.param}: {_one_line(matcher.get_error(), spec.kind)}", param=spec.param)
        mask = llg_numpy.allocate_token_bitmask(1, self.vocab_size)
        llg_numpy.fill_next_token_bitmask(matcher, mask)  # warms the lexer for every copy
        if matcher.is_error():
            raise InvalidRequest(f"{spec.param}: {_one_line(matcher.get_error(), spec.kind)}", param=spec.param)
        self._cache[spec.key] = matcher
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return matcher

    def check(self, spec: GrammarSpec) -> Future:
        """Compile (or find) `spec`; the future raises InvalidRequest when it cannot compile."""
        return self._thread.submit(self._compiled, spec)

    def matchers(self, spec: GrammarSpec, replays: list[list[int]]) -> Future:
        """One matcher per choice, each advanced through that choice's already-delivered tokens (a
        resumed request), as a future of the list."""
        def build() -> list[Matcher]:
            pristine = self._compiled(spec)
            out = []
            for tokens in replays:
                m = Matcher(pristine.deep_copy(), self.eos_ids)
                for t in tokens:
                    m.advance(t)
                out.append(m)
            return out

        return self._thread.submit(build)

    def prefetch(self, matchers: list[Matcher]) -> None:
        """Start computing these matchers' next masks on the mask thread; `apply_masks` takes them. At
        32 rows x 202k tokens a fill takes ~1-4 ms (more while a new state builds its lexer) and the
        unpack ~0.5 ms, now behind the forward pass (on a GPU entirely; on a CPU where cores are free)."""
        if not matchers:
            return
        job = self._mask_thread.submit(self._forbidden, matchers)
        for i, m in enumerate(matchers):
            m.prefetched = (job, i, m.consumed)

    def _forbidden(self, matchers: list[Matcher]) -> np.ndarray:
        """[rows, vocab] bool: True where the row's grammar forbids the token (on the mask thread)."""
        mask = llg_numpy.allocate_token_bitmask(len(matchers), self.vocab_size)
        if len(matchers) == 1:
            llg_numpy.fill_next_token_bitmask(matchers[0].inner, mask, 0)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(num_threads=2)
            llg_numpy.fill_next_token_bitmask_par(self._executor, [(m.inner, i) for i, m in enumerate(matchers)],
                                                  mask)
        packed = mask.view(np.uint8)  # bit t of row r: token t allowed (little-endian bytes)
        primary = self.eos_ids[0]
        dead = ~packed.any(axis=1)
        if dead.any():  # a grammar with no way on (an error state): let the row end
            packed[dead, primary // 8] |= np.uint8(1 << primary % 8)
        primary_allowed = (packed[:, primary // 8] >> (primary % 8)) & 1
        for eos in self.eos_ids[1:]:  # every end id where llguidance's own is allowed
            byte, bit = eos // 8, np.uint8(1 << eos % 8)
            packed[:, byte] = np.where(primary_allowed == 1, packed[:, byte] | bit, packed[:, byte] & ~bit)
        return np.unpackbits(~packed, axis=1, count=self.vocab_size, bitorder="little").view(bool)

    def apply_masks(self, logits_NV: torch.Tensor, rows: list[int], matchers: list[Matcher],
                    inplace: bool = False) -> torch.Tensor:
        """`logits_NV` with every token its row's grammar forbids at -inf (a copy unless `inplace`).
        Prefetched masks are taken; the others are computed now. Masking 32 rows x 202k tokens takes
        ~2.3 ms here; torch's masked_fill with a bool mask took ~4 ms."""
        forbidden: list[np.ndarray | None] = [m.take_prefetched() for m in matchers]
        missing = [i for i, f in enumerate(forbidden) if f is None]
        if missing:  # on the mask thread too: one LLExecutor, never two fills at once
            fresh = self._mask_thread.submit(self._forbidden, [matchers[i] for i in missing]).result()
            for i, f in zip(missing, fresh):
                forbidden[i] = f
        out = logits_NV if inplace else logits_NV.clone()
        if out.device.type != "cpu":
            index = torch.tensor(rows, dtype=torch.long, device=out.device)
            masked = out.index_select(0, index).masked_fill_(torch.from_numpy(np.stack(forbidden)).to(out.device),
                                                             float("-inf"))
            return out.index_copy_(0, index, masked)
        values = out.numpy()
        for r, f in zip(rows, forbidden):
            np.copyto(values[r], -np.inf, where=f)
        return out


def _one_line(message: str, kind: str = "") -> str:
    """llguidance's multi-line error as one line for an API error body. Its `at L(C): ...` position
    and source excerpt are of the Lark text it wraps a regex in, so a regex's error keeps only what
    is wrong (`invalid regex "[a-z": unclosed character class`); a grammar's says where."""
    if "NoExtensionBias" in message:  # compiled, but no token can start it: its state dump says so
        what = "JSON schema" if kind == "json" else "grammar"
        return (f"the {what} admits no output at all" +
                (" (a $ref cycle that never reaches a value?)" if kind == "json" else ""))
    lines = message.strip().splitlines()
    head = re.match(r"at (\d+)\((\d+)\): (.*)", lines[0]) if lines else None
    if head is None:
        text = " ".join(message.split())
        return (text[:500] + "...") if len(text) > 500 else (text or "the grammar does not compile")
    what = head.group(3).replace(" (in regex)", "").rstrip(":").removesuffix(" regex parse error").rstrip(":")
    cause = next((line.strip()[len("error: "):] for line in lines if line.strip().startswith("error: ")), None)
    text = f"{what}: {cause}" if cause else what
    if kind != "regex":
        text = f"line {head.group(1)} column {head.group(2)}: {text}"
    return text[:500]
