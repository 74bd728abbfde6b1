"""Images in chat messages: ``data:`` and ``http(s)`` URLs -> decoded PIL images, within limits.

Every failure is a 400 naming the message part and what went wrong (a bad URL, an unreachable
host, a 404, too many redirects, a slow server, too many bytes or pixels, bytes that are not an
image), never a 500. Downloads run on the event loop with httpx's async client (they wait on the
network, not the CPU); decoding runs in a worker thread. Pillow reads the image size from the
header before decoding any pixels, so a decompression bomb is refused before it costs memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import bad_request

FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


@dataclass
class MediaLimits:
    max_images: int = 8  # per request (--limit-images-per-request)
    max_bytes: int = 20 * 2**20  # per image, encoded (--max-image-bytes)
    max_pixels: int = 40_000_000  # per image, decoded width x height (--max-image-pixels)
    fetch_timeout: float = 10.0  # seconds for one http(s) image, redirects included
    max_redirects: int = 3
    allowed_domains: list[str] = field(default_factory=list)  # empty: any host (--allowed-media-domains)


def image_parts(messages: list[dict]) -> list[tuple[str, str]]:
    """(param path, url) of every image part, in the order they appear."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "image_url":
                    out.append((f"messages[{i}].content[{j}].image_url.url", part["image_url"]["url"]))
    return out


def _host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (a.lower().strip(".") for a in allowed))


def _decode_data_url(url: str, param: str, limits: MediaLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise bad_request(
            "a data URL must look like data:image/png;base64,<data>", param=param, code="invalid_image_url"
        )
    if not header.endswith(";base64"):
        raise bad_request(
            "only base64 data URLs are supported (data:image/...;base64,...)", param=param, code="invalid_image_url"
        )
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise bad_request(
            f"the image is larger than the limit of {limits.max_bytes} bytes", param=param, code="image_too_large"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data URL's base64 payload is malformed", param=param, code="invalid_image_url") from None


def _check_target(url: str, param: str, limits: MediaLimits) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise bad_request(
            f"image URLs must be data:, http: or https: URLs; got scheme {parts.scheme or '(none)'!r}",
            param=param,
            code="invalid_image_url",
        )
    if not parts.hostname:
        raise bad_request("the image URL has no host", param=param, code="invalid_image_url")
    if limits.allowed_domains and not _host_allowed(parts.hostname, limits.allowed_domains):
        raise bad_request(
            f"images may only be fetched from {', '.join(limits.allowed_domains)}; {parts.hostname!r} is not allowed",
            param=param,
            code="image_domain_not_allowed",
        )


async def _fetch(client: httpx.AsyncClient, url: str, param: str, limits: MediaLimits) -> bytes:
    async def follow(url: str) -> bytes:
        for _ in range(limits.max_redirects + 1):
            _check_target(url, param, limits)
            async with client.stream("GET", url) as r:
                if r.is_redirect:
                    location = r.headers.get("location")
                    if not location:
                        raise bad_request(
                            f"fetching the image: {r.status_code} redirect without a Location",
                            param=param,
                            code="image_fetch_failed",
                        )
                    url = urljoin(url, location)
                    continue
                if r.status_code != 200:
                    raise bad_request(
                        f"fetching the image: the server answered {r.status_code}",
                        param=param,
                        code="image_fetch_failed",
                    )
                length = r.headers.get("content-length")
                if length and length.isdigit() and int(length) > limits.max_bytes:
                    raise bad_request(
                        f"the image is {length} bytes; the limit is {limits.max_bytes}",
                        param=param,
                        code="image_too_large",
                    )
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_bytes:
                        raise bad_request(
                            f"the image is larger than the limit of {limits.max_bytes} bytes",
                            param=param,
                            code="image_too_large",
                        )
                return bytes(data)
        raise bad_request(
            f"fetching the image: more than {limits.max_redirects} redirects", param=param, code="image_fetch_failed"
        )

    try:
        return await asyncio.wait_for(follow(url), limits.fetch_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise bad_request(
            f"fetching the image took longer than {limits.fetch_timeout:g} s", param=param, code="image_fetch_failed"
        ) from None
    except httpx.HTTPError as exc:
        raise bad_request(
            f"fetching the image failed: {type(exc).__name__}: {exc}", param=param, code="image_fetch_failed"
        ) from None


def decode_image(data: bytes, param: str, limits: MediaLimits):
    """Bytes -> an RGB PIL image (a GIF's first frame); refuses non-images and too many pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad_request(
            "the data is not an image in a supported format (PNG, JPEG, WebP, GIF)", param=param, code="invalid_image"
        ) from None
    if img.format not in FORMATS:
        raise bad_request(
            f"unsupported image format {img.format}; send PNG, JPEG, WebP or GIF", param=param, code="invalid_image"
        )
    w, h = img.size
    if w * h > limits.max_pixels:
        raise bad_request(
            f"the image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}",
            param=param,
            code="image_too_large",
        )
    try:
        img.seek(0)
        return img.convert("RGB")
    except Exception as exc:  # truncated or corrupt data behind a valid header
        raise bad_request(f"the image could not be decoded: {exc}", param=param, code="invalid_image") from None


async def load_images(messages: list[dict], limits: MediaLimits, client: httpx.AsyncClient | None = None) -> list:
    """The decoded images of a request's messages, in order (an empty list when there are none)."""
    parts = image_parts(messages)
    if not parts:
        return []
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, timeout=limits.fetch_timeout)
    try:

        async def one(param: str, url: str):
            if url.startswith("data:"):
                data = _decode_data_url(url, param, limits)
            else:
                data = await _fetch(client, url, param, limits)
            if len(data) > limits.max_bytes:
                raise bad_request(
                    f"the image is {len(data)} bytes; the limit is {limits.max_bytes}",
                    param=param,
                    code="image_too_large",
                )
            return await asyncio.to_thread(decode_image, data, param, limits)

        return list(await asyncio.gather(*(one(p, u) for p, u in parts)))
    finally:
        if own:
            await client.aclose()


__all__ = ["MediaLimits", "image_parts", "load_images", "decode_image"]
