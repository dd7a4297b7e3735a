"""The vision tower and image preprocessing against transformers: tower outputs and logits within 1e-4 in
fp32, greedy tokens identical, pixel values and placeholder tokens equal to the library's processor."""

import pytest
import torch

from model.images import ImageError, ImageLimits, ImageProcessor, decode_image, image_token_ids
from model.loader import load_vision_tower
from model.tiny import make_tiny
from model.tokenizer import Tokenizer
from tests.vision import IMAGES, hf_image_greedy, hf_image_logits, image_bytes, reference_processor

TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("vision") / "ckpt", "tiny-maverick", seed=5, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def setup(ckpt):
    tok = Tokenizer(ckpt)
    return ImageProcessor.from_model_dir(ckpt), tok, image_token_ids(tok)


def test_tower_matches_transformers(ckpt, hf):
    tower = load_vision_tower(ckpt)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.multi_modal_projector(hf.vision_model(pixels).last_hidden_state.flatten(0, 1))
    ours = tower(pixels)
    assert ours.shape == (3 * tower.config.tokens_per_tile, hf.config.text_config.hidden_size)
    assert (ours - ref).abs().max().item() <= TOL


def test_pixel_values_and_placeholders_equal_the_library_processor(ckpt, setup, tmp_path):
    processor, tok, ids = setup
    images = [image_bytes(**spec, seed=i) for i, spec in enumerate(IMAGES)]
    text = "<|begin_of_text|>look:" + "<|image|> and" * len(images)
    ref = reference_processor(ckpt, text, images, tmp_path)
    processed = [processor.process(data) for data in images]
    assert {p.aspect_ratio for p in processed} >= {(1, 1), (2, 3), (4, 1), (4, 4), (1, 16)}
    assert torch.equal(torch.cat([p.pixel_values for p in processed]), ref["pixel_values"])
    assert processor.expand(tok.encode(text, add_special_tokens=False), processed, ids) == ref["input_ids"]


def _chat_prompt(setup, images):
    processor, tok, ids = setup
    content = [{"type": "text", "text": "Describe"}]
    for _ in images:
        content += [{"type": "image"}, {"type": "text", "text": " then"}]
    prompt = tok.encode_chat([{"role": "user", "content": content}])
    return processor.expand(prompt, images, ids)


def _our_logits(ckpt, prompt, images):
    from model.batch import build_metadata
    from model.generate import ContiguousCache
    from model.loader import load_pretrained

    model, tower = load_pretrained(ckpt), load_vision_tower(ckpt)
    features = tower(torch.cat([im.pixel_values for im in images]))
    rows = torch.tensor([i for i, t in enumerate(prompt) if t == tower.config.image_token_index])
    cache = ContiguousCache(model, 1, len(prompt))
    positions, meta = build_metadata(model.config, [cache.slots(0, 0, len(prompt))])
    return model.logits(model(torch.tensor(prompt), positions, meta, cache.kv, (rows, features)))


def test_logits_and_greedy_tokens_with_images_match_transformers(ckpt, hf, setup):
    processor = setup[0]
    images = [processor.process(image_bytes(40, 23, seed=1)), processor.process(image_bytes(16, 16, seed=2))]
    prompt = _chat_prompt(setup, images)
    pixels = torch.cat([im.pixel_values for im in images])
    ref = hf_image_logits(hf, prompt, pixels)
    assert (_our_logits(ckpt, prompt, images) - ref).abs().max().item() <= TOL
    # the image matters: another image under the same placeholder tokens changes the logits
    other = [processor.process(image_bytes(40, 23, seed=9)), images[1]]
    assert (hf_image_logits(hf, prompt, torch.cat([im.pixel_values for im in other])) - ref).abs().max() > 1e-2

    from workers.config import EngineConfig
    from workers.llm import LLM
    from workers.protocol import GenerateRequest
    from workers.sampling_params import SamplingParams

    engine = LLM(ckpt, EngineConfig(max_num_batched_tokens=48)).engine  # prefill chunks cut through images
    engine.submit(GenerateRequest(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                  "img", images=images))
    tokens = []
    while not tokens or not out.finished:
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == hf_image_greedy(hf, prompt, pixels, 8)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"GIF89a not really", "cannot decode"),
    (image_bytes(64, 64)[:200], "cannot decode"),  # truncated PNG
    (b"\x00" * 64, "cannot decode"),
])
def test_bad_image_data_is_an_image_error(data, reason):
    with pytest.raises(ImageError, match=reason) as info:
        decode_image(data)
    assert " at 0x" not in str(info.value)  # Pillow names its buffer's repr: not in an API error


def test_image_limits():
    with pytest.raises(ImageError, match="bytes; the limit"):
        decode_image(image_bytes(32, 32), ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match="pixels; the limit"):
        decode_image(image_bytes(100, 100), ImageLimits(max_pixels=5000))


def test_placeholder_count_must_match_the_images(setup):
    processor, tok, ids = setup
    image = processor.process(image_bytes(16, 16))
    with pytest.raises(ImageError, match="2 <\\|image\\|> placeholders for 1 images"):
        processor.expand(tok.encode("<|image|><|image|>", add_special_tokens=False), [image], ids)
