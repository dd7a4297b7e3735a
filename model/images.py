"""Llama 4 image preprocessing: bytes -> tiles of pixel values, and the prompt's placeholder tokens.

Equal to transformers' `Llama4ImageProcessor` (torchvision backend), written with Pillow and torch
alone: decode, RGB (transparency composited on white), the best-fit canvas of at most `max_patches`
tiles, an aspect-preserving bilinear antialiased resize (never upscaled past one tile), zero padding
to the canvas, the cast to bfloat16 *before* rescaling and normalising, tiles in row order, and a
global tile (the whole image squashed into one tile) after them when there is more than one.
`tests/model/test_images.py` checks the output against the library's, value for value.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from model.vision import VisionConfig, load_vision_config

PLACEHOLDER = "<|image|>"  # what the chat template writes for an image part
IMAGE_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                "<|tile_y_separator|>")


class ImageError(ValueError):
    """The bytes are no image this server accepts (the message says why, for a 400)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # encoded size
    max_pixels: int = 40_000_000  # decoded width x height: refuses decompression bombs


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [tiles, 3, S, S] bfloat16, the global tile last
    aspect_ratio: tuple[int, int]  # tile rows, tile columns of the canvas
    digest: bytes  # of the pixel values: what the prefix cache keys the image's blocks by

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


@dataclass(frozen=True)
class ImageProcessor:
    vision: VisionConfig
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    limits: ImageLimits = ImageLimits()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, limits: ImageLimits = ImageLimits()) -> "ImageProcessor | None":
        """None for a checkpoint without a vision tower."""
        vision = load_vision_config(model_dir)
        if vision is None:
            return None
        path = Path(model_dir) / "preprocessor_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        size = raw.get("size") or {"height": vision.image_size, "width": vision.image_size}
        if size.get("height") != vision.image_size or size.get("width") != vision.image_size:
            raise ValueError(f"{path}: tile size {size} differs from the vision tower's {vision.image_size}")
        return cls(vision, raw.get("max_patches", 16), raw.get("resize_to_max_canvas", False),
                   tuple(raw.get("image_mean", (0.5,) * 3)), tuple(raw.get("image_std", (0.5,) * 3)),
                   raw.get("rescale_factor", 1 / 255), limits)

    @property
    def tile(self) -> int:
        return self.vision.image_size

    def process(self, data: bytes) -> ProcessedImage:
        return self.preprocess(decode_image(data, self.limits))

    def preprocess(self, image_CHW: torch.Tensor) -> ProcessedImage:
        """uint8 RGB [3, H, W] -> tiles."""
        h, w = image_CHW.shape[-2:]
        canvas = best_fit((h, w), supported_resolutions(self.max_patches, self.tile), self.resize_to_max_canvas)
        bound = canvas if self.resize_to_max_canvas else (min(max(h, self.tile), canvas[0]),
                                                          min(max(w, self.tile), canvas[1]))
        new_h, new_w = size_without_distortion((h, w), bound)
        resized = resize(image_CHW, max(new_h, 1), max(new_w, 1))
        padded = F.pad(resized, (0, canvas[1] - resized.shape[-1], 0, canvas[0] - resized.shape[-2]))
        rows, cols = canvas[0] // self.tile, canvas[1] // self.tile
        tiles = self._normalize(padded).view(3, rows, self.tile, cols, self.tile)
        tiles = tiles.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, self.tile, self.tile)
        if rows * cols > 1:
            whole = self._normalize(resize(image_CHW, self.tile, self.tile))
            tiles = torch.cat([tiles, whole[None]])
        tiles = tiles.contiguous()
        digest = hashlib.blake2b(tiles.view(torch.int16).numpy().tobytes(), digest_size=16).digest()
        return ProcessedImage(tiles, (rows, cols), digest)

    def _normalize(self, image_CHW: torch.Tensor) -> torch.Tensor:
        # NOTE: bfloat16 before the arithmetic, as the reference does (its comment: "as in the original")
        x = image_CHW.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.bfloat16).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.bfloat16).view(-1, 1, 1)
        return x.sub(mean).div_(std)

    def placeholder_ids(self, image: ProcessedImage, token_ids: dict[str, int]) -> list[int]:
        """What one `<|image|>` of the prompt becomes: the tiles' `<|patch|>` runs with their separators,
        then the global (or only) tile's, between `<|image_start|>` and `<|image_end|>`."""
        patch = [token_ids["<|patch|>"]] * self.vision.tokens_per_tile
        ids = [token_ids["<|image_start|>"]]
        rows, cols = image.aspect_ratio
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    ids += patch + ([token_ids["<|tile_x_separator|>"]] if x < cols - 1 else [])
                ids.append(token_ids["<|tile_y_separator|>"])
        return ids + [token_ids["<|image|>"]] + patch + [token_ids["<|image_end|>"]]

    def expand(self, prompt_ids: list[int], images: list[ProcessedImage], token_ids: dict[str, int]) -> list[int]:
        """Replace the prompt's `<|image|>` tokens, one per image in order, by their placeholders."""
        marker = token_ids[PLACEHOLDER]
        found = prompt_ids.count(marker)
        if found != len(images):
            raise ImageError(f"the prompt has {found} {PLACEHOLDER} placeholders for {len(images)} images")
        out: list[int] = []
        it = iter(images)
        for t in prompt_ids:
            out.extend(self.placeholder_ids(next(it), token_ids) if t == marker else [t])
        return out


def image_token_ids(tokenizer) -> dict[str, int]:
    """The special tokens of an image's placeholder, by name; a tokenizer without them cannot serve images."""
    ids = {t: tokenizer.token_to_id(t) for t in IMAGE_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ImageError(f"the tokenizer lacks the image tokens {missing}")
    return ids


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """Encoded bytes -> uint8 RGB [3, H, W]; anything Pillow cannot fully decode is an `ImageError`."""
    from PIL import Image

    if not data:
        raise ImageError("the image is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_pixels:
                raise ImageError(f"the image is {image.width}x{image.height} pixels; the limit is "
                                 f"{limits.max_pixels} pixels")
            image.load()  # a truncated file fails here, not later in a worker
            rgb = to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        # its messages may name the buffer (`<_io.BytesIO object at 0x...>`): no object reprs in an API error
        detail = _OBJECT_REPR.sub("", str(exc)).strip() or "not an image Pillow reads"
        raise ImageError(f"cannot decode the image: {type(exc).__name__}: {detail}") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def to_rgb(image):
    """RGB as transformers converts it: any transparency composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize(image_CHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear with antialiasing, as torchvision resizes a uint8 tensor on the CPU: natively in uint8
    where torch has a vectorised uint8 kernel, else in float32 then rounded."""
    if image_CHW.shape[-2:] == (height, width):
        return image_CHW
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64", "arm64")  # torchvision 0.29's test
    x = image_CHW[None] if native else image_CHW[None].float()
    out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (out if native else out.round_().to(torch.uint8))[0]


@lru_cache(maxsize=8)
def supported_resolutions(max_tiles: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Every canvas of at most `max_tiles` tiles, in the reference's order (ties go to the first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for count in range(max_tiles, 0, -1):
        for rows in sorted(_factors(count)):
            by_ratio[rows / (count // rows)].append((rows, count // rows))
    return tuple((r * tile, c * tile) for sizes in by_ratio.values() for r, c in sizes)


def _factors(n: int) -> set[int]:
    return {f for i in range(1, int(n ** 0.5) + 1) if n % i == 0 for f in (i, n // i)}


def best_fit(size: tuple[int, int], resolutions: tuple[tuple[int, int], ...], to_max: bool) -> tuple[int, int]:
    """The canvas needing the least upscaling (or, when every canvas shrinks the image, the least
    downscaling); among equal scales, the smallest area. Float32 arithmetic, as the reference's."""
    canvases = torch.tensor(resolutions)
    scale_h, scale_w = canvases[:, 0] / size[0], canvases[:, 1] / size[1]
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])] if len(candidates) > 1 else candidates[0]
    return int(best[0]), int(best[1])


def size_without_distortion(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    """The largest size with the image's aspect ratio inside `bound`."""
    (h, w), (bh, bw) = size, bound
    scale_w, scale_h = bw / w, bh / h
    if scale_w < scale_h:
        return min(math.floor(h * scale_w), bh), bw
    return bh, min(math.floor(w * scale_h), bw)
