"""Image inputs at the ingress: URLs -> bytes -> tiles, every failure a 400 before a worker sees anything.

`data:image/...;base64,...` URLs always work. `http(s)` URLs are fetched only from the hosts an operator
lists (`images.allowed_hosts`), without following redirects, within a size and time limit: a server
that fetches whatever URL a client names can be made to reach inside the network it runs in.
Decoding and tiling run on a thread, off the ingress's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import urllib.error
import urllib.parse
import urllib.request

from cluster.config import ImageSettings
from model.images import ImageError, ImageLimits, ImageProcessor, ProcessedImage
from workers.errors import InvalidRequest

# base64 characters per decode call (a multiple of 4): the decoder holds the GIL through a call, ~1 ms
DECODE_CHUNK = 1 << 18


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could leave the allowed hosts
        return None


class ImageLoader:
    def __init__(self, processor: ImageProcessor | None, settings: ImageSettings, param: str = "messages"):
        limits = ImageLimits(settings.max_bytes, settings.max_pixels)
        self.processor = dataclasses.replace(processor, limits=limits) if processor is not None else None
        self.settings, self.param = settings, param
        self.allowed = {h.lower() for h in settings.allowed_hosts}
        self._opener = urllib.request.build_opener(_NoRedirect)

    async def load(self, sources: list[str | bytes]) -> list[ProcessedImage]:
        """URLs (or raw bytes, from gRPC) in prompt order -> processed images; InvalidRequest on any fault."""
        if not sources:
            return []
        if self.processor is None:
            raise InvalidRequest("this model has no vision tower: image inputs are not supported", param=self.param)
        if len(sources) > self.settings.max_per_request:
            raise InvalidRequest(f"{len(sources)} images in one request; the limit is "
                                 f"{self.settings.max_per_request}", param=self.param)
        blobs = [s if isinstance(s, bytes) else await self._bytes(s) for s in sources]
        return await asyncio.to_thread(self._process, blobs)

    def _process(self, blobs: list[bytes]) -> list[ProcessedImage]:
        images = []
        for i, data in enumerate(blobs):
            try:
                images.append(self.processor.process(data))
            except ImageError as exc:
                raise InvalidRequest(f"image {i}: {exc}", param=self.param) from None
        return images

    async def _bytes(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise InvalidRequest("an image_url needs a url", param=self.param)
        if url.startswith("data:"):
            if len(url) < DECODE_CHUNK:
                return self._data_url(url)
            return await asyncio.to_thread(self._data_url, url)  # in chunks: the loop gets the GIL between them
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise InvalidRequest("image URLs must be data: URLs (or http(s) from an allowed host)", param=self.param)
        host = (parsed.hostname or "").lower()
        if host not in self.allowed:
            raise InvalidRequest(f"fetching images from {host or 'that URL'!r} is not allowed: send the image as a "
                                 "base64 data: URL (operators allow hosts with images.allowed_hosts)",
                                 param=self.param)
        return await asyncio.to_thread(self._fetch, url)

    def _data_url(self, url: str) -> bytes:
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64") or not header.startswith("image/"):
            raise InvalidRequest("a data URL image must be data:image/<type>;base64,<data>", param=self.param)
        if len(payload) > self.settings.max_bytes * 4 // 3 + 4:
            raise InvalidRequest(f"the image is over {self.settings.max_bytes} bytes", param=self.param)
        try:
            return b"".join(base64.b64decode(payload[i:i + DECODE_CHUNK], validate=True)
                            for i in range(0, len(payload), DECODE_CHUNK))
        except (binascii.Error, ValueError):
            raise InvalidRequest("the image's base64 data is malformed", param=self.param) from None

    def _fetch(self, url: str) -> bytes:
        limit = self.settings.max_bytes
        try:
            with self._opener.open(url, timeout=self.settings.fetch_timeout_s) as response:
                data = response.read(limit + 1)
        except urllib.error.HTTPError as exc:
            raise InvalidRequest(f"fetching the image failed: HTTP {exc.code}", param=self.param) from None
        except (OSError, ValueError) as exc:  # timeouts, refused connections, bad URLs
            raise InvalidRequest(f"fetching the image failed: {exc}", param=self.param) from None
        if len(data) > limit:
            raise InvalidRequest(f"the image is over {limit} bytes", param=self.param)
        return data

