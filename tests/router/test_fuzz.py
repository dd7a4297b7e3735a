"""Hostile input never gets a 5xx, and the server goes on serving exactly (hypothesis).

1,000 malformed HTTP requests against a live deployment: bodies with wrong types, extreme and
non-finite numbers, deep nesting and odd unicode in every field; truncated, binary and absurdly nested
raw bodies; wrong methods and huge headers: every answer below 500. 200 gRPC requests: messages with
extreme, non-finite and out-of-vocabulary values get INVALID_ARGUMENT (or NOT_FOUND for an unknown
model); undecodable bytes are refused without harm. A good request afterwards returns the tokens it returned
before.
"""

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import maverick_v1_pb2 as pb
from router import maverick_v1_pb2_grpc as pb_grpc
from tests.router.conftest import deploy

pytestmark = pytest.mark.timeout(900)
GOOD = {"model": "tiny", "prompt": [2016, 5, 6, 7], "max_tokens": 6, "temperature": 0, "return_token_ids": True}
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "n", "logit_bias", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stream", "stream_options", "logprobs", "top_logprobs",
          "prompt_logprobs", "echo", "best_of", "suffix", "tools", "tool_choice", "parallel_tool_calls",
          "response_format", "structured_outputs", "guided_json", "return_token_ids", "user"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True)

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
                | st.sampled_from(["\u0000", "\ud7ff\ufffd", "\ud800x", "🙂" * 50, "\u202e", "a" * 5000]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# generation lengths a fuzzer may hit by chance stay tiny: max_tokens is either junk or 1-3
max_tokens = st.integers(1, 3) | st.integers(-(2**40), 0) | st.integers(10**7, 2**64) | json_values.filter(
    lambda v: not isinstance(v, int) or isinstance(v, bool))


@st.composite
def bodies(draw):
    body = {"max_tokens": draw(max_tokens)}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        body[field] = draw(json_values if field != "max_tokens" else max_tokens)
    if draw(st.booleans()):
        body.setdefault("prompt", [2016, 5])
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = draw(max_tokens)
    return body


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("fuzz"), request_timeout_s=60, max_body_bytes=1 << 20)
    yield server


def send(live, method: str, path: str, body: bytes | None, headers: dict | None = None) -> tuple[int, bytes]:
    host, port = live.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def good_tokens(live) -> list[int]:
    status, data = send(live, "POST", "/v1/completions", json.dumps(GOOD).encode())
    assert status == 200, data
    return json.loads(data)["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def before(live):
    return good_tokens(live)


@settings(max_examples=600, **SETTINGS)
@given(body=bodies(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       nan=st.sampled_from([None, "NaN", "Infinity", "-Infinity", "1e999"]))
def test_malformed_fields_get_4xx(live, before, body, path, nan):
    raw = json.dumps(body, allow_nan=True)
    if nan is not None:  # a non-finite number in a numeric field, as raw JSON text
        raw = raw[:-1] + (", " if len(body) else "") + f'"temperature": {nan}' + "}"
    status, data = send(live, "POST", path, raw.encode())
    assert status < 500, (status, raw[:300], data[:300])
    if status != 200:
        error = json.loads(data)["error"]
        assert error["code"] == status and error["message"]


@settings(max_examples=300, **SETTINGS)
@given(raw=st.one_of(st.binary(max_size=300), st.integers(1, 20000).map(lambda n: b"[" * n),
                     st.integers(1, 20000).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b"}"),
                     st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
                     bodies().map(lambda b: json.dumps(b).encode()).flatmap(
                         lambda data: st.integers(0, max(0, len(data) - 1)).map(lambda cut: data[:cut]))),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]))
def test_truncated_binary_and_deep_bodies_get_4xx(live, before, raw, path):
    status, data = send(live, "POST", path, raw)
    assert status < 500, (status, raw[:200], data[:300])


@settings(max_examples=100, **SETTINGS)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/metrics",
                             "/v1/nope", "/%00", "/v1/completions/../../etc/passwd"]),
       header=st.sampled_from([{}, {"x-junk": "a" * 16000}, {"authorization": "Bearer " + "k" * 8000},
                               {"content-type": "text/plain"}, {"content-length": "abc"}]))
def test_wrong_methods_paths_and_headers_get_no_5xx(live, before, method, path, header):
    body = None if method in ("GET", "DELETE") else json.dumps(GOOD).encode()
    try:
        status, _ = send(live, method, path, body, header)
    except (http.client.HTTPException, ConnectionError):  # a server may refuse a broken request outright
        return
    assert status < 500, (method, path, header.keys())


floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
grpc_requests = st.builds(
    lambda ids, prompt, fields, bias, stop: pb.GenerateRequest(prompt_token_ids=ids, **prompt, **fields,
                                                               logit_bias=bias, stop=stop),
    ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6),
    prompt=st.sampled_from([{}, {"prompt": "hi"}, {"prompt": ""}, {"prompt": "\u202e" * 100}]),
    fields=st.fixed_dictionaries({}, optional={
        "max_tokens": st.sampled_from([0, 1, 2, 2**32 - 1]), "temperature": floats, "top_p": floats,
        "top_k": st.integers(-(2**31), 2**31 - 1), "min_p": floats, "seed": st.integers(-(2**63), 2**63 - 1),
        "n": st.sampled_from([0, 1, 2, 10**6]), "logprobs": st.sampled_from([0, 1, 2**32 - 1]),
        "presence_penalty": floats, "repetition_penalty": floats, "prompt_logprobs": st.sampled_from([0, 10**9]),
        "model": st.sampled_from(["", "tiny", "nope"])}),
    bias=st.dictionaries(st.integers(-(2**31), 2**31 - 1), floats, max_size=3),
    stop=st.lists(st.sampled_from(["", "a", "\u0000"]), max_size=3))


@pytest.fixture(scope="module")
def channel(live):
    import grpc

    channel = grpc.insecure_channel(live.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield channel
    channel.close()


@settings(max_examples=90, **SETTINGS)  # a valid request generates (~0.35 s each on 2 cores)
@given(req=grpc_requests, method=st.sampled_from(["Generate", "GenerateStream"]))
def test_malformed_grpc_fields_get_client_codes(channel, before, req, method):
    import grpc

    code, details = grpc_outcome(channel, method, req)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, details)


def grpc_outcome(channel, method: str, req) -> tuple:
    """The call's status code and details, and no gRPC call object left for a failure's traceback to hold."""
    import grpc

    call = getattr(pb_grpc.GenerationStub(channel), method)
    try:
        result = call(req, metadata=[("application", "maverick")], timeout=120)
        if method == "GenerateStream":
            list(result)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


@settings(max_examples=50, **SETTINGS)
@given(raw=st.binary(max_size=200))
def test_undecodable_grpc_messages_are_refused_and_harmless(channel, before, raw):
    """Bytes that are no GenerateRequest never reach our code: Serve's gRPC proxy answers UNKNOWN
    ("Wire format was corrupt"), a status we cannot set (NOTES.md); what we check is that nothing runs
    and nothing breaks."""
    import grpc

    call = channel.unary_unary("/maverick.v1.Generation/Generate", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    try:
        reply = call(raw, metadata=[("application", "maverick")], timeout=120)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT), (exc.code(), exc.details())
    else:  # bytes that happen to decode (b"" is an empty request): refused as any bad request would be
        pytest.fail(f"undecodable bytes {raw!r} were served: {reply!r}")


def test_the_server_still_serves_exactly(live, before):
    assert good_tokens(live) == before
