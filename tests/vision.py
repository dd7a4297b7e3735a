"""Images for the vision tests, and transformers as the reference for them (shared by several modules)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image


ROOT = Path(__file__).resolve().parent.parent
VISION_PYTHON = ROOT / ".venv-vision" / "bin" / "python"  # `make .venv-vision/.installed`


def image_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """Noise with a smooth gradient on top, so resizing matters and every pixel differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(width - 1, 1) + y * 127 // max(height - 1, 1)) % 256
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = (base[..., None] + rng.integers(0, 64, (height, width, channels))) % 256
    image = Image.fromarray(pixels.astype(np.uint8).squeeze(-1) if channels == 1 else pixels.astype(np.uint8), mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


# 1 tile, several tiles + global in each direction, a downscaled canvas, a sliver; alpha, grey, JPEG
IMAGES = [dict(width=16, height=16), dict(width=40, height=23), dict(width=7, height=50),
          dict(width=100, height=100), dict(width=333, height=17), dict(width=30, height=20, mode="RGBA"),
          dict(width=25, height=25, mode="L"), dict(width=48, height=31, fmt="JPEG")]


def reference_processor(model_dir: Path, text: str, images: list[bytes], work: Path) -> dict:
    """transformers' `Llama4Processor` on these images, run in `.venv-vision` (tests/model/vision_reference.py)."""
    if not VISION_PYTHON.exists():
        raise RuntimeError(f"{VISION_PYTHON} is missing: run `make .venv-vision/.installed` (make test does)")
    paths = []
    for i, data in enumerate(images):
        paths.append(work / f"image{i}")
        paths[-1].write_bytes(data)
    out = work / "reference.pt"
    subprocess.run([str(VISION_PYTHON), str(ROOT / "tests/model/vision_reference.py"), str(model_dir), str(out),
                    text, *map(str, paths)], check=True, timeout=300)
    return torch.load(out, weights_only=False)


@torch.no_grad()
def hf_image_logits(hf, ids: list[int], pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Logits [S, V] of `Llama4ForConditionalGeneration` with images, composed from its own modules as
    its forward composes them (that forward fails at its return in transformers 5.24: it reads
    `image_outputs` from the language model's output, which has none)."""
    t = torch.tensor([ids])
    embeds = hf.get_input_embeddings()(t)
    if pixel_values is not None:
        features = hf.vision_model(pixel_values.float()).last_hidden_state
        projected = hf.multi_modal_projector(features.flatten(0, 1))
        embeds = embeds.masked_scatter((t == hf.config.image_token_id)[..., None], projected)
    return hf.language_model(inputs_embeds=embeds, use_cache=False).logits[0]


def hf_image_greedy(hf, prompt: list[int], pixel_values: torch.Tensor | None, max_new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(hf_image_logits(hf, ids, pixel_values)[-1].argmax()))
    return ids[len(prompt):]
