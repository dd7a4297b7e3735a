"""Images through the served API on the package's default app (1 attention + 2 expert gang, images
from 127.0.0.1 allowed, 3 per request at most): base64 data URLs with the `openai`
client (whole and streamed) and image bytes over gRPC give transformers' greedy tokens; bad images get
the error table's 400 / INVALID_ARGUMENT and the next request is served; remote URLs are fetched only
from allowed hosts (a real HTTP server on 127.0.0.1), without following redirects."""

import base64
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import openai
import pytest
import torch

from model.images import ImageProcessor
from router import maverick_v1_pb2 as pb
from router import maverick_v1_pb2_grpc as pb_grpc
from tests.vision import hf_image_greedy, image_bytes

pytestmark = pytest.mark.timeout(600)
WIDE, SMALL = image_bytes(40, 23, seed=1), image_bytes(16, 16, seed=2)
PATCH = 2047  # <|patch|> in make-tiny's tokenizer (test_patch_token_id checks it)


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server name
        if self.path == "/wide.png":
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.end_headers()
            self.wfile.write(WIDE)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("location", "http://localhost:1/elsewhere.png")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hf(live):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(live.model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=120)


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def messages(*urls: str) -> list[dict]:
    content = [{"type": "text", "text": "Compare"}]
    for url in urls:
        content += [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": " with"}]
    return [{"role": "user", "content": content}]


def expected(live, hf, prompt: list[int], images: list[bytes], n: int) -> list[int]:
    processor = ImageProcessor.from_model_dir(live.model_dir)
    pixels = torch.cat([processor.process(data).pixel_values for data in images])
    tokens = hf_image_greedy(hf, prompt, pixels, n)
    eos = {2017, 2023, 2024}
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


def test_patch_token_id(live, hf):
    assert hf.config.image_token_id == PATCH


def test_chat_with_base64_images_equals_transformers(live, client, hf):
    out = client.chat.completions.create(model="tiny", messages=messages(data_url(WIDE), data_url(SMALL, "jpeg")),
                                         max_completion_tokens=8, temperature=0.0,
                                         extra_body={"return_token_ids": True})
    prompt = out.model_extra["prompt_token_ids"]
    # 2x3 tiles + global for the wide image, 1 tile for the small one: 16 patch tokens each
    assert sum(t == PATCH for t in prompt) == (7 + 1) * 16
    assert out.usage.prompt_tokens == len(prompt)
    assert out.choices[0].model_extra["token_ids"] == expected(live, hf, prompt, [WIDE, SMALL], 8)

    stream = client.chat.completions.create(model="tiny", messages=messages(data_url(WIDE), data_url(SMALL, "jpeg")),
                                            max_completion_tokens=8, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    # the same images again: the prefix cache serves their blocks
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_different_images_under_the_same_tokens_are_not_confused(live, client, hf):
    other = image_bytes(40, 23, seed=7)  # same size as WIDE: the same placeholder tokens
    a = client.chat.completions.create(model="tiny", messages=messages(data_url(WIDE)), max_completion_tokens=6,
                                       temperature=0.0, extra_body={"return_token_ids": True})
    b = client.chat.completions.create(model="tiny", messages=messages(data_url(other)), max_completion_tokens=6,
                                       temperature=0.0, extra_body={"return_token_ids": True})
    assert a.model_extra["prompt_token_ids"] == b.model_extra["prompt_token_ids"]
    assert b.choices[0].model_extra["token_ids"] == expected(live, hf, b.model_extra["prompt_token_ids"], [other], 6)
    # no block after the first image token came from `a`'s cached blocks
    first_image_token = b.model_extra["prompt_token_ids"].index(PATCH)
    assert b.usage.prompt_tokens_details.cached_tokens <= first_image_token


def test_remote_urls_only_from_allowed_hosts(live, client, hf, image_server):
    out = client.chat.completions.create(model="tiny", messages=messages(image_server + "/wide.png"),
                                         max_completion_tokens=6, temperature=0.0,
                                         extra_body={"return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == expected(live, hf, out.model_extra["prompt_token_ids"],
                                                               [WIDE], 6)
    refused = image_server.replace("127.0.0.1", "localhost") + "/wide.png"
    for url, reason in [(refused, "not allowed"), (image_server + "/redirect", "HTTP 302"),
                        (image_server + "/missing.png", "HTTP 404"), ("file:///etc/passwd", "data: URLs")]:
        with pytest.raises(openai.BadRequestError, match=reason):
            client.chat.completions.create(model="tiny", messages=messages(url), max_completion_tokens=2)


BAD = [
    ("truncated", [data_url(image_bytes(64, 64)[:300])], "cannot decode"),
    ("not an image", [data_url(b"plain text, no pixels")], "cannot decode"),
    ("empty", ["data:image/png;base64,"], "empty"),
    ("bad base64", ["data:image/png;base64,@@@"], "base64"),
    ("not base64", ["data:image/png," + "x" * 10], "data:image"),
    ("not an image type", ["data:text/plain;base64,aGk="], "data:image"),
    ("too many", [data_url(SMALL)] * 4, "limit is 3"),
    ("no url", [""], "needs image_url.url"),
]


@pytest.mark.parametrize("name,urls,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_images_get_400_and_the_next_request_is_served(live, client, name, urls, reason):
    with pytest.raises(openai.BadRequestError, match=reason) as info:
        client.chat.completions.create(model="tiny", messages=messages(*urls), max_completion_tokens=2)
    assert info.value.body["type"] == "invalid_request_error" and info.value.body["param"] == "messages"
    assert " at 0x" not in info.value.body["message"]  # no Python object repr in an API error
    ok = client.chat.completions.create(model="tiny", messages=messages(data_url(SMALL)), max_completion_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_tokenize_counts_image_tokens(live, client):
    body = json.dumps({"messages": messages(data_url(SMALL))}).encode()
    req = urllib.request.Request(live.url + "/tokenize", body, {"content-type": "application/json"})
    tokens = json.loads(urllib.request.urlopen(req).read())["tokens"]
    chat = client.chat.completions.create(model="tiny", messages=messages(data_url(SMALL)), max_completion_tokens=1,
                                          extra_body={"return_token_ids": True})
    assert tokens == chat.model_extra["prompt_token_ids"] and tokens.count(PATCH) == 16


def test_grpc_carries_image_bytes(live, client, hf):
    stub = pb_grpc.GenerationStub(grpc.insecure_channel(live.grpc_target))
    http = client.chat.completions.create(model="tiny", messages=messages(data_url(WIDE)), max_completion_tokens=6,
                                          temperature=0.0, extra_body={"return_token_ids": True})
    # a text prompt gets its BOS from the server, as HTTP completions do
    prompt_text = "<|header_start|>user<|header_end|>\n\nCompare<|image|> with<|eot|>" \
                  "<|header_start|>assistant<|header_end|>\n\n"
    reply = stub.Generate(pb.GenerateRequest(prompt=prompt_text, images=[WIDE], max_tokens=6, temperature=0.0),
                          timeout=120)
    assert list(reply.prompt_token_ids) == http.model_extra["prompt_token_ids"]
    assert list(reply.choices[0].token_ids) == http.choices[0].model_extra["token_ids"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt=prompt_text, images=[b"not an image"], max_tokens=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode" in info.value.details() and " at 0x" not in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # two images for one placeholder
        stub.Generate(pb.GenerateRequest(prompt=prompt_text, images=[WIDE, SMALL], max_tokens=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "placeholders" in info.value.details()


def test_a_large_data_url_decodes_in_chunks_exactly_and_a_bad_chunk_is_refused():
    import asyncio
    import os

    from cluster.config import ImageSettings
    from router.images import DECODE_CHUNK, ImageLoader
    from workers.errors import InvalidRequest

    loader = ImageLoader(None, ImageSettings(max_bytes=8 * DECODE_CHUNK))
    blob = os.urandom(2 * DECODE_CHUNK + 5)  # about 2.7 chunks of base64, with padding at the end
    encoded = base64.b64encode(blob).decode()
    assert asyncio.run(loader._bytes("data:image/png;base64," + encoded)) == blob
    broken = encoded[:DECODE_CHUNK + 8] + "!" + encoded[DECODE_CHUNK + 9:]  # in the second chunk
    with pytest.raises(InvalidRequest, match="malformed"):
        asyncio.run(loader._bytes("data:image/png;base64," + broken))
