"""maverick.v1.Generation through Ray Serve's gRPC proxy, with the committed stubs.

The same deployment serves HTTP and gRPC; both doors must give the same tokens, the error table's
codes, the API key as metadata, cancel and deadline aborting the request, and reflection.
"""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from router import maverick_v1_pb2 as pb
from router import maverick_v1_pb2_grpc as pb_grpc
from tests.router.conftest import deploy

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-grpc"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def live(local_ray, tmp_path_factory):
    server = deploy(tmp_path_factory.mktemp("grpc"), api_key=KEY, request_timeout_s=20, expert_workers=1)
    yield server


@pytest.fixture(scope="module")
def stub(live):
    channel = grpc.insecure_channel(live.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield pb_grpc.GenerationStub(channel)
    channel.close()


def md(key=KEY):
    out = [("application", "maverick")]
    if key is not None:
        out.append(("authorization", f"Bearer {key}"))
    return out


def http(live, body):
    req = urllib.request.Request(live.url + "/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", str(ROOT / "router/maverick_v1.proto")], check=True)
    for name in ("maverick_v1_pb2.py", "maverick_v1_pb2_grpc.py"):
        assert (tmp_path / "router" / name).read_text() == (ROOT / "router" / name).read_text(), \
            f"router/{name} is stale: regenerate it (see the header of router/maverick_v1.proto)"


def test_unary_and_stream_equal_http(live, stub):
    prompt = [2016, 11, 12, 13, 14, 15]
    expected = http(live, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True})
    expected_ids = expected["choices"][0]["token_ids"]
    req = pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=12, temperature=0.0)
    response, call = stub.Generate.with_call(req, metadata=md(), timeout=60)
    assert list(response.choices[0].token_ids) == expected_ids
    assert response.choices[0].text == expected["choices"][0]["text"]
    assert response.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert response.usage.completion_tokens == len(expected_ids) and response.usage.prompt_tokens == len(prompt)
    assert dict(call.trailing_metadata()).get("request_id")

    messages = list(stub.GenerateStream(req, metadata=md(), timeout=60))
    assert [t for m in messages for c in m.choices for t in c.token_ids] == expected_ids
    assert "".join(c.text for m in messages for c in m.choices) == expected["choices"][0]["text"]
    assert list(messages[0].prompt_token_ids) == prompt and messages[-1].HasField("usage")

    echo = stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=2, temperature=0.0, echo=True,
                                            logprobs=1), metadata=md(), timeout=60)
    http_echo = http(live, {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1})
    assert echo.choices[0].text == http_echo["choices"][0]["text"]
    assert len(echo.prompt_logprobs) == len(prompt) - 1
    assert [lp.logprob for lp in echo.prompt_logprobs] == pytest.approx(
        http_echo["choices"][0]["logprobs"]["token_logprobs"][1:len(prompt)], abs=1e-5)

    text = stub.Generate(pb.GenerateRequest(prompt="Hello there", max_tokens=6, temperature=0.0, n=2, seed=1,
                                            logprobs=2), metadata=md(), timeout=60)
    assert [c.index for c in text.choices] == [0, 1]
    assert all(len(c.logprobs) == len(c.token_ids) and len(c.logprobs[0].top) == 2 for c in text.choices)
    assert list(text.prompt_token_ids) == http(live, {"prompt": "Hello there", "max_tokens": 1,
                                                      "return_token_ids": True})["choices"][0]["prompt_token_ids"]


@pytest.mark.parametrize("req,key,code", [
    (pb.GenerateRequest(prompt_token_ids=[2016, 5], temperature=-1.0), KEY, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt_token_ids=[99999]), KEY, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(), KEY, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt_token_ids=[2016, 5], max_tokens=10**6), KEY, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt_token_ids=[2016, 5], model="nope"), KEY, grpc.StatusCode.NOT_FOUND),
    (pb.GenerateRequest(prompt_token_ids=[2016, 5]), None, grpc.StatusCode.UNAUTHENTICATED),
    (pb.GenerateRequest(prompt_token_ids=[2016, 5]), "wrong", grpc.StatusCode.UNAUTHENTICATED),
    (pb.GenerateRequest(prompt="x", structured=pb.StructuredOutput(json_schema='{"type": "strng"}')), KEY,
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(prompt="x", structured=pb.StructuredOutput(regex="a(b")), KEY,
     grpc.StatusCode.INVALID_ARGUMENT),
], ids=["temperature", "oov", "empty", "context", "model", "no key", "wrong key", "bad schema", "bad regex"])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_bad_requests_get_the_table_codes(stub, req, key, code, method):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, method)(req, metadata=md(key), timeout=60)
        if method == "GenerateStream":
            list(result)
    assert err.value.code() == code, err.value.details()
    assert "Traceback" not in (err.value.details() or "")
    ok = stub.Generate(pb.GenerateRequest(prompt_token_ids=[2016, 5], max_tokens=2), metadata=md(), timeout=60)
    assert len(ok.choices[0].token_ids) == 2


def _in_flight(live) -> int:
    from ray import serve

    return serve.get_deployment_handle("gangs", live.app_name).stats.remote().result()["in_flight"]


def _wait_idle(live, seconds=60.0) -> int:  # generous: a loaded CI machine aborts slowly
    deadline = time.monotonic() + seconds
    while (n := _in_flight(live)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def test_cancel_and_deadline_abort_in_the_engine(live, stub):
    long = pb.GenerateRequest(prompt_token_ids=[2016, 8, 9], max_tokens=3000, ignore_eos=True, temperature=0.0)
    stream = stub.GenerateStream(long, metadata=md(), timeout=60)
    next(stream)
    stream.cancel()
    assert _wait_idle(live) == 0

    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(long, metadata=md(), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(live) == 0


def test_reflection_lists_the_service(live):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(live.grpc_target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "maverick.v1.Generation" in services


def test_cached_tokens_agree_with_http(live, stub):
    """Both doors count a prompt's cache hits once, by its first choice (never more than the prompt)."""
    prompt = [2016] + list(range(900, 980))  # 81 tokens
    req = pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=2, temperature=0.0, n=2)
    cold = stub.Generate(req, metadata=md(), timeout=60).usage
    assert cold.cached_tokens == 0 and cold.prompt_tokens == 81
    warm = [m.usage for m in stub.GenerateStream(req, metadata=md(), timeout=60) if m.HasField("usage")][-1]
    assert warm.cached_tokens == 80
    body = http(live, {"prompt": prompt, "max_tokens": 2, "temperature": 0, "n": 2})
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == warm.cached_tokens


def test_structured_outputs_over_grpc(stub):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    req = pb.GenerateRequest(prompt="Weather?", max_tokens=60, temperature=1.0, seed=3, n=4,
                             structured=pb.StructuredOutput(json_schema=json.dumps(schema)))
    whole = stub.Generate(req, metadata=md(), timeout=120)
    for c in whole.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    streamed: dict[int, str] = {}
    for message in stub.GenerateStream(req, metadata=md(), timeout=120):
        for c in message.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in whole.choices]  # seeded: the same draws
    options = ["north", "south"]
    out = stub.Generate(pb.GenerateRequest(prompt="Which?", max_tokens=8, temperature=1.0, seed=1, n=3,
                                           structured=pb.StructuredOutput(choice=pb.ChoiceList(options=options))),
                        metadata=md(), timeout=60)
    assert all(c.text in options for c in out.choices)


def grpc_tickets(live) -> tuple[float, float]:
    """gRPC requests received, and ended by any outcome, from the replica's own GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(live.url + "/metrics", headers={"authorization": f"Bearer {KEY}"})
    received = ended = 0.0
    for family in text_string_to_metric_families(urllib.request.urlopen(req, timeout=30).read().decode()):
        for sample in family.samples:
            if sample.labels.get("protocol") == "grpc" and sample.name == "maverick_requests_received_total":
                received += sample.value
            elif sample.labels.get("protocol") == "grpc" and sample.name == "maverick_requests_total":
                ended += sample.value
    return received, ended


def test_a_schema_nested_past_the_recursion_limit_is_invalid_and_ends_in_one_outcome(live, stub):
    """A schema of 100,000 nested brackets is the client's error, with one clean line; its ticket gets
    one outcome. (An untyped failure in admission ends in one outcome too: test_request_life.py.)"""
    nested = pb.GenerateRequest(prompt_token_ids=[2016, 5], max_tokens=2,
                                structured=pb.StructuredOutput(json_schema="[" * 100_000))
    received, ended = grpc_tickets(live)
    assert received == ended  # nothing in flight
    for call in (lambda: stub.Generate(nested, metadata=md(), timeout=60),
                 lambda: list(stub.GenerateStream(nested, metadata=md(), timeout=60))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details() == "structured.json_schema: the JSON schema is nested too deeply"
    assert grpc_tickets(live) == (received + 2, ended + 2)
