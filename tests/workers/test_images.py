"""Images in the engine: the prefix cache keys a block by the images inside it, so equal placeholder
tokens with different images never share KV blocks; images in a batch with text requests, preempted
and recomputed, still give the same tokens."""

import pytest
import torch

from model.images import ImageProcessor, image_token_ids
from model.tiny import make_tiny
from model.tokenizer import Tokenizer
from tests.vision import image_bytes
from tests.workers.drive import run_all, token_ids
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.errors import InvalidRequest
from workers.protocol import GenerateRequest
from workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("images") / "ckpt", "tiny-maverick", seed=6, dtype=torch.float32)


@pytest.fixture(scope="module")
def setup(ckpt):
    tok = Tokenizer(ckpt)
    return ImageProcessor.from_model_dir(ckpt), tok, image_token_ids(tok)


def prompt_with(setup, image):
    processor, tok, ids = setup
    text = tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": "What is in"},
                                                         {"type": "image"}, {"type": "text", "text": "?"}]}])
    return processor.expand(text, [image], ids)


def run(engine, rid, prompt, images, params=GREEDY):
    engine.submit(GenerateRequest(prompt, params, rid, images=images))
    outs = run_all(engine)[rid]
    return token_ids(outs), outs[-1].usage.cached_tokens


def test_equal_placeholders_with_different_images_share_no_blocks(ckpt, setup):
    processor = setup[0]
    x, y = processor.process(image_bytes(40, 23, seed=1)), processor.process(image_bytes(40, 23, seed=2))
    prompt = prompt_with(setup, x)
    assert prompt == prompt_with(setup, y) and x.digest != y.digest
    first_image_token = prompt.index(setup[2]["<|patch|>"])
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig())
    tokens_x, _ = run(engine, "x", prompt, [x])
    tokens_y, cached_y = run(engine, "y", prompt, [y])
    assert cached_y <= first_image_token  # only the text before the image came from x's blocks
    tokens_x_again, cached_x_again = run(engine, "x2", prompt, [x])
    assert cached_x_again >= (len(prompt) - 1) // 16 * 16 > first_image_token  # the image's blocks are reused
    assert tokens_x_again == tokens_x
    alone = LLMEngine.from_model_dir(ckpt, EngineConfig(enable_prefix_caching=False))
    assert run(alone, "y", prompt, [y])[0] == tokens_y
    assert tokens_x != tokens_y  # the images decide: a confusion would have shown


def test_images_under_preemption_and_in_a_mixed_batch(ckpt, setup):
    processor = setup[0]
    images = [processor.process(image_bytes(w, h, seed=s)) for w, h, s in ((40, 23, 3), (16, 16, 4), (7, 50, 5))]
    prompts = [prompt_with(setup, im) for im in images]
    alone = LLMEngine.from_model_dir(ckpt, EngineConfig(enable_prefix_caching=False))
    expected = [run(alone, f"a{i}", p, [im])[0] for i, (p, im) in enumerate(zip(prompts, images))]
    # a small cache and chunk budget: prefills are cut through images and requests get preempted
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig(max_num_batched_tokens=40, kv_blocks={
        "chunked_attention": 24, "full_attention": 24}))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for i, (p, im) in enumerate(zip(prompts, images)):
        engine.submit(GenerateRequest(p, params, f"r{i}", images=[im]))
    engine.submit(GenerateRequest([1, 2, 3, 4], params, "text"))
    outs = run_all(engine)
    assert engine.num_preemptions_total > 0
    for i in range(3):
        assert token_ids(outs[f"r{i}"])[:6] == expected[i]


def test_mismatched_images_are_refused(ckpt, setup):
    processor = setup[0]
    image = processor.process(image_bytes(16, 16))
    prompt = prompt_with(setup, image)
    engine = LLMEngine.from_model_dir(ckpt, EngineConfig())
    with pytest.raises(InvalidRequest, match="image patch tokens"):
        engine.submit(GenerateRequest(prompt, GREEDY, "two", images=[image, image]))
    with pytest.raises(InvalidRequest, match="image patch tokens"):
        engine.submit(GenerateRequest(prompt[:-20], GREEDY, "cut", images=[image]))
    engine.submit(GenerateRequest(prompt, GREEDY, "text"))  # without images `<|patch|>` is a plain token
    assert len(token_ids(run_all(engine)["text"])) == 6
