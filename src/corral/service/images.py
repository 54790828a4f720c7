"""Images for vision models: where an image's bytes come from, what is accepted, and the prompt they make.

Sources: `data:` URLs with base64 content, `http(s)` URLs (fetched with a total timeout, a size cap and a
Content-Type check) and, for Ollama's native `images` lists, bare base64. Any other scheme (`file:`,
`ftp:`, ...) is refused: a server must not read its own disk or other protocols for a client.

What is accepted is decided from the bytes, not from what a URL or data URL claims: PNG, JPEG, GIF (its
first frame), BMP and WebP, within CORRAL_MAX_IMAGE_BYTES and CORRAL_MAX_IMAGE_PIXELS. Pillow reads only
the header to decide; the pixels are decoded by llama.cpp's own loader (stb_image, as llama-server does)
except WebP, which stb_image lacks and Pillow decodes.

Every refusal is an `InvalidRequest` whose `param` names the image (`messages[0].content[1]`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from ..config import Settings
from ..engine.vision import Bitmap, MediaPrompt, VisionContext, VisionError
from .errors import EngineFailure, InvalidRequest
from .models import LoadedModel

# Pillow's format names; MPO is the multi-picture JPEG some cameras write.
FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp"}
ACCEPTED = "png, jpeg, webp, gif or bmp"
_LLAMA_DECODES = {"png", "jpeg", "gif", "bmp"}  # what stb_image reads
_WHITESPACE = re.compile(rb"\s+")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986; base64 never holds a ':'
FETCHES_AT_ONCE = 8  # per request


@dataclass(frozen=True)
class ImageInput:
    """An image's encoded bytes, checked: a supported format within the limits."""

    data: bytes
    format: str  # png | jpeg | gif | bmp | webp
    width: int
    height: int
    param: str  # where the request holds it, for errors
    sha256: str


def _describe(source: str) -> str:
    return source if len(source) <= 80 else source[:77] + "..."


def _b64(text: str, param: str, what: str, settings: Settings) -> bytes:
    raw = _WHITESPACE.sub(b"", text.encode("ascii", errors="replace"))
    if len(raw) * 3 // 4 > settings.max_image_bytes + 3:
        raise InvalidRequest(f"{param}: the image is more than {settings.max_image_bytes} bytes "
                             "(CORRAL_MAX_IMAGE_BYTES)", param=param)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param}: {what} is not valid base64", param=param) from None


def check(data: bytes, param: str, settings: Settings) -> ImageInput:
    """The bytes as an accepted image, from their header alone; a 400 that says what is wrong otherwise."""
    if not data:
        raise InvalidRequest(f"{param}: the image is empty", param=param)
    if len(data) > settings.max_image_bytes:
        raise InvalidRequest(f"{param}: the image is {len(data)} bytes, more than {settings.max_image_bytes} "
                             "(CORRAL_MAX_IMAGE_BYTES)", param=param)
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{param}: the image has too many pixels", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidRequest(f"{param}: the data is not an image ({ACCEPTED})", param=param) from None
    fmt = FORMATS.get(kind or "")
    if fmt is None:
        raise InvalidRequest(f"{param}: {kind} images are not supported ({ACCEPTED})", param=param)
    if width < 1 or height < 1:
        raise InvalidRequest(f"{param}: the image is empty ({width}x{height})", param=param)
    if width * height > settings.max_image_pixels:
        raise InvalidRequest(f"{param}: the image is {width}x{height}, more than {settings.max_image_pixels} "
                             "pixels (CORRAL_MAX_IMAGE_PIXELS)", param=param)
    return ImageInput(data, fmt, width, height, param, hashlib.sha256(data).hexdigest())


async def _fetch(url: str, param: str, settings: Settings) -> bytes:
    limit, timeout = settings.max_image_bytes, settings.image_fetch_timeout
    shown = _describe(url)
    try:
        async with asyncio.timeout(timeout):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=5) as client:
                async with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                    if response.status_code != 200:
                        raise InvalidRequest(f"{param}: fetching {shown} failed with HTTP {response.status_code}",
                                             param=param)
                    kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
                    if not kind.startswith("image/"):
                        raise InvalidRequest(f"{param}: {shown} is not an image (its Content-Type is "
                                             f"{kind or 'missing'})", param=param)
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise InvalidRequest(f"{param}: {shown} is {declared} bytes, more than {limit} "
                                             "(CORRAL_MAX_IMAGE_BYTES)", param=param)
                    body = bytearray()
                    async for piece in response.aiter_bytes():
                        body += piece
                        if len(body) > limit:
                            raise InvalidRequest(f"{param}: {shown} is more than {limit} bytes "
                                                 "(CORRAL_MAX_IMAGE_BYTES)", param=param)
                    return bytes(body)
    except (TimeoutError, httpx.TimeoutException):  # the whole fetch's limit, or one of httpx's own
        raise InvalidRequest(f"{param}: fetching {shown} timed out after {timeout:g} s "
                             "(CORRAL_IMAGE_FETCH_TIMEOUT)", param=param) from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise InvalidRequest(f"{param}: could not fetch {shown}: {reason}", param=param) from None


async def read_image(source: str, param: str, settings: Settings, bare_base64: bool = False) -> ImageInput:
    """One image from a data URL, an http(s) URL or (with `bare_base64`, for Ollama's `images`) base64."""
    source = source.strip()
    if source[:5].lower() == "data:":
        header, comma, payload = source[5:].partition(",")
        if not comma:
            raise InvalidRequest(f"{param}: the data URL has no ',' before its data", param=param)
        if "base64" not in (part.strip().lower() for part in header.split(";")[1:]):
            raise InvalidRequest(f"{param}: a data URL image must be base64 (data:image/png;base64,...)",
                                 param=param)
        return check(_b64(payload, param, "the data URL's data", settings), param, settings)
    found = _SCHEME.match(source)
    scheme = found.group(1).lower() if found else ""
    if scheme in ("http", "https"):
        return check(await _fetch(source, param, settings), param, settings)
    if scheme:
        raise InvalidRequest(f"{param}: {scheme}: URLs are not supported; give an https:// or http:// URL or a "
                             "data:image/...;base64 URL", param=param)
    if bare_base64:
        return check(_b64(source, param, "the image", settings), param, settings)
    raise InvalidRequest(f"{param}: {_describe(source)!r} is not an image URL; give an https:// or http:// URL "
                         "or a data:image/...;base64 URL", param=param)


async def read_images(sources: Sequence[tuple[str, str]], settings: Settings,
                      bare_base64: bool = False) -> list[ImageInput]:
    """Every `(source, param)`, fetched concurrently (a few at a time), in order; the first failure in request
    order is the error."""
    gate = asyncio.Semaphore(FETCHES_AT_ONCE)

    async def one(source: str, param: str) -> ImageInput:
        async with gate:
            return await read_image(source, param, settings, bare_base64)

    results = await asyncio.gather(*(one(s, p) for s, p in sources), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)  # type: ignore[arg-type]


def vision_of(loaded: LoadedModel, model_name: str, param: str) -> VisionContext:
    """The model's vision context; a model without a projector is a 400 naming it."""
    runner = loaded.runner
    if not loaded.has_projector:
        raise InvalidRequest(f"model '{model_name}' does not support images: it has no vision projector",
                             param=param)
    if runner.vision is None:
        raise EngineFailure(f"model '{model_name}' cannot take images: "
                            f"{runner.vision_error or 'its vision projector is not loaded'}")
    return runner.vision


def _bitmap(vision: VisionContext, image: ImageInput) -> Bitmap:
    if image.format in _LLAMA_DECODES:
        try:
            return vision.decode(image.data)
        except VisionError:
            pass  # Pillow gets a second try; if it fails too, the image is broken
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            opened.seek(0)  # an animation's first frame
            rgb = opened.convert("RGB")
            return VisionContext.from_rgb(rgb.width, rgb.height, rgb.tobytes(), image.sha256)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, VisionError):
        raise InvalidRequest(f"{image.param}: the {image.format} image could not be decoded (damaged or "
                             "truncated)", param=image.param) from None


def _tokenize(vision: VisionContext, text: str, images: Sequence[ImageInput], add_special: bool,
              param: str) -> MediaPrompt:
    bitmaps: list[Bitmap] = []
    try:
        for image in images:
            bitmaps.append(_bitmap(vision, image))
        try:
            return vision.tokenize(text, bitmaps, add_special)
        except VisionError as exc:
            raise InvalidRequest(f"the images could not be prepared for the model: {exc}", param=param) from None
    finally:
        for bitmap in bitmaps:
            bitmap.free()


async def tokenize(loaded: LoadedModel, model_name: str, text: str, images: Sequence[ImageInput],
                   add_special: bool, param: str = "messages") -> MediaPrompt:
    """`text` (holding `marker(...)` once per image, in order) and the images as tokens and image spans, for
    `GenerateJob(prompt=result.tokens, media=result.media)`. Decoding and preprocessing run in a worker thread."""
    vision = vision_of(loaded, model_name, param)
    prompt = await asyncio.to_thread(_tokenize, vision, text, images, add_special, param)
    if vision.non_causal and prompt.media:  # such an image is evaluated in one batch, beside decoding tokens
        config = loaded.runner.config
        widest = max(span.n_tokens for span in prompt.media)
        if widest > config.n_batch - config.n_parallel:
            raise InvalidRequest(f"an image takes {widest} tokens, which must fit one batch of {config.n_batch} "
                                 f"tokens beside {config.n_parallel} decoding sequences; raise CORRAL_BATCH_SIZE "
                                 "or the model's num_batch", param=param)
    return prompt


def marker(loaded: LoadedModel, model_name: str, param: str) -> str:
    """The text that stands for one image in a prompt for this model (unguessable, so user text never is one)."""
    return vision_of(loaded, model_name, param).marker
