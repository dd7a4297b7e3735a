"""Streams of mixed requests over both doors, read chunk by chunk, and the same requests through one
in-process engine: the outputs a test compares (per choice: tokens, text, finish reason, logprobs).

A spec: prompt, max_tokens, n, temperature, seed, stop, logprobs, door ("http" or "grpc"), and optionally
schema (a JSON schema every choice must follow) and ignore_eos (HTTP only)."""

import json

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from openai import OpenAI

from router import maverick_v1_pb2 as pb
from router import maverick_v1_pb2_grpc as pb_grpc
from workers.engine import LLMEngine
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams
from workers.structured import GrammarSpec


def reference(model_dir, specs) -> list[list[dict]]:
    """The same requests through one in-process engine: per choice, tokens, text, finish, logprobs."""
    engine = LLMEngine.from_model_dir(model_dir)
    requests = []
    for s in specs:
        params = SamplingParams(max_tokens=s["max_tokens"], n=s["n"], temperature=s["temperature"], seed=s["seed"],
                                stop=s["stop"], logprobs=s["logprobs"], ignore_eos=s.get("ignore_eos", False),
                                structured=GrammarSpec.json_schema(s["schema"]) if s.get("schema") else None)
        requests.append(GenerateRequest(s["prompt"], params))
        engine.submit(requests[-1])
    results = {r.request_id: [{"ids": [], "text": "", "finish": None, "logprobs": []} for _ in range(r.params.n)]
               for r in requests}
    open_choices = sum(s["n"] for s in specs)
    while open_choices:
        for out in engine.step():
            choice = results[out.request_id][out.index]
            choice["ids"] += out.new_token_ids
            choice["text"] += out.text_delta or ""
            choice["logprobs"] += [lp.logprob for lp in out.logprobs or []]
            if out.finished:
                choice["finish"] = out.finish_reason
                open_choices -= 1
    return [results[r.request_id] for r in requests]


def over_http(live, spec, on_chunk=None) -> list[dict]:
    client = OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=300)
    choices = [{"ids": [], "text": "", "finish": None, "logprobs": [], "chunks": 0} for _ in range(spec["n"])]
    stream = client.completions.create(
        model=live.model_name, prompt=spec["prompt"], max_tokens=spec["max_tokens"], n=spec["n"],
        temperature=spec["temperature"], seed=spec["seed"], stop=spec["stop"] or None, logprobs=spec["logprobs"],
        stream=True, extra_body={"return_token_ids": True, **({"ignore_eos": True} if spec.get("ignore_eos") else {}),
                                 **({"structured_outputs": {"json": spec["schema"]}} if spec.get("schema") else {})})
    for chunk in stream:
        if on_chunk is not None:
            on_chunk()
        for c in chunk.choices:
            choice = choices[c.index]
            choice["ids"] += c.model_extra.get("token_ids") or []
            choice["text"] += c.text
            choice["chunks"] += 1
            if c.logprobs is not None:
                choice["logprobs"] += c.logprobs.token_logprobs or []
            if c.finish_reason:
                assert choice["finish"] is None, "a second finish"
                choice["finish"] = c.finish_reason
    return choices


def over_grpc(live, spec, on_chunk=None) -> list[dict]:
    channel = grpc.insecure_channel(live.grpc_target)
    try:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt_token_ids=spec["prompt"], max_tokens=spec["max_tokens"], n=spec["n"],
                                     temperature=spec["temperature"], stop=spec["stop"])
        if spec["seed"] is not None:
            request.seed = spec["seed"]
        if spec["logprobs"] is not None:
            request.logprobs = spec["logprobs"]
        if spec.get("schema"):
            request.structured.json_schema = json.dumps(spec["schema"])
        choices = [{"ids": [], "text": "", "finish": None, "logprobs": [], "chunks": 0} for _ in range(spec["n"])]
        usage = None
        for message in stub.GenerateStream(request, metadata=[("application", live.app_name)], timeout=300):
            if on_chunk is not None:
                on_chunk()
            for c in message.choices:
                choice = choices[c.index]
                choice["ids"] += list(c.token_ids)
                choice["text"] += c.text
                choice["chunks"] += 1
                choice["logprobs"] += [lp.logprob for lp in c.logprobs]
                if c.finish_reason:
                    assert choice["finish"] is None, "a second finish"
                    choice["finish"] = c.finish_reason
            if message.HasField("usage"):
                assert usage is None, "usage twice"
                usage = message.usage
        assert usage is not None and usage.completion_tokens == sum(len(c["ids"]) for c in choices)
        return choices
    finally:
        channel.close()


def assert_same(specs, expected, got) -> None:
    """Every choice of every stream as in process: each token once, in order; text, finish, logprobs."""
    for i, (spec, want, have) in enumerate(zip(specs, expected, got)):
        for index, (w, h) in enumerate(zip(want, have, strict=True)):
            where = f"stream {i} ({spec['door']}) choice {index}"
            assert h["ids"] == w["ids"], where  # every token once, in order
            assert h["text"] == w["text"] and h["finish"] == w["finish"], where
            assert h["chunks"] >= 1 and len(h["logprobs"]) == len(w["logprobs"]), where
            assert h["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4), where


def run_with_fault(live, specs, fault) -> tuple[list, float]:
    """Every stream, with `fault()` called once all have their first chunk; the longest pause seen."""
    first = threading.Barrier(len(specs) + 1, timeout=300)
    pause = [0.0]

    def run(i_spec):
        i, spec = i_spec
        last, seen_first = [time.monotonic()], [False]

        def on_chunk():
            now = time.monotonic()
            if seen_first[0]:
                pause[0] = max(pause[0], now - last[0])
            else:
                seen_first[0] = True
                first.wait()
            last[0] = now

        return (over_grpc if spec["door"] == "grpc" else over_http)(live, spec, on_chunk)

    with ThreadPoolExecutor(len(specs)) as pool:
        futures = pool.map(run, enumerate(specs))
        first.wait()
        fault()
        got = list(futures)
    return got, pause[0]
