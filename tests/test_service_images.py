"""Image sources and checks without a model: what is accepted, and the 400 that says why when it is not."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from corral.config import Settings
from corral.service.errors import InvalidRequest
from corral.service.images import check, read_image, read_images

SETTINGS = Settings(max_image_bytes=50_000, max_image_pixels=10_000, image_fetch_timeout=1.0)


def encoded(fmt: str, size: tuple[int, int] = (20, 10), **options) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, fmt, **options)
    return out.getvalue()


def read(source: str, bare: bool = False):
    return asyncio.run(read_image(source, "messages[0].content[1]", SETTINGS, bare_base64=bare))


def refused(source: str, bare: bool = False) -> str:
    with pytest.raises(InvalidRequest) as info:
        read(source, bare)
    assert info.value.param == "messages[0].content[1]"
    assert info.value.message.startswith("messages[0].content[1]: ")
    return info.value.message


@pytest.mark.parametrize("fmt, name", [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("BMP", "bmp"),
                                       ("WEBP", "webp")])
def test_accepted_formats_are_told_from_the_bytes(fmt, name):
    data = encoded(fmt)
    image = read(f"data:application/octet-stream;base64,{base64.b64encode(data).decode()}")
    assert (image.format, image.width, image.height, image.data) == (name, 20, 10, data)


def test_data_urls_may_wrap_their_base64_and_use_any_case():
    data = encoded("PNG")
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    assert read(f"data:image/png;base64,{wrapped}").data == data
    assert read(f"DATA:image/png;BASE64,{text}").data == data


def test_bare_base64_only_where_asked_for():
    text = base64.b64encode(encoded("PNG")).decode()
    assert read(text, bare=True).format == "png"
    assert "is not an image URL" in refused(text)
    assert "file: URLs are not supported" in refused("file:///etc/passwd", bare=True)


@pytest.mark.parametrize("source, words", [
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png;base64,aGVsbG8", "not valid base64"),  # missing padding
    ("data:image/png,abc", "must be base64"),
    ("data:image/png;base64", "no ','"),
    ("data:image/png;base64,", "the image is empty"),
    ("data:image/png;base64," + base64.b64encode(b"<svg></svg>").decode(), "not an image"),
    ("data:image/tiff;base64," + base64.b64encode(encoded("TIFF")).decode(), "TIFF images are not supported"),
    ("data:image/png;base64," + base64.b64encode(encoded("PNG", (200, 100))).decode(), "more than 10000 pixels"),
    ("data:image/png;base64," + base64.b64encode(bytes(70_000)).decode(), "more than 50000 bytes"),
    ("ftp://example.com/a.png", "ftp: URLs are not supported"),
    ("javascript:alert(1)", "javascript: URLs are not supported"),
    ("//example.com/a.png", "is not an image URL"),
])
def test_refusals_say_why(source, words):
    assert words in refused(source)


def test_check_refuses_empty_and_oversized_bytes():
    with pytest.raises(InvalidRequest, match="empty"):
        check(b"", "images[0]", SETTINGS)
    with pytest.raises(InvalidRequest, match="more than 50000"):
        check(b"\x89PNG" + b"\x00" * 60_000, "images[0]", SETTINGS)


def test_the_first_bad_image_in_request_order_is_the_error():
    good = "data:image/png;base64," + base64.b64encode(encoded("PNG")).decode()
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(read_images([(good, "a"), ("file:///x", "b"), ("ftp://y", "c")], SETTINGS))
    assert info.value.param == "b"
    images = asyncio.run(read_images([(good, "a"), (good, "b")], SETTINGS))
    assert [i.param for i in images] == ["a", "b"] and images[0].sha256 == images[1].sha256
