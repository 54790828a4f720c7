"""Vision end to end: a tiny random-weight vision model built by tests/vision_fixture.py, created with two FROM
files, served through /v1/chat/completions (the official client, both image_url forms) and /api/chat.

Random weights say nothing about what an image shows, so the checks are about mechanics: the same image
gives the same output at temperature 0, different images give different outputs, identical pixels in
different formats give identical outputs, prompt tokens grow by the image's token count, an image met again
is not encoded again, URLs are fetched from a local HTTP server, and every bad input is a 400 that says why.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image

import vision_fixture
from conftest import start_server, stop_server

MODEL = "tiny-vision"
TEXT_MODEL = "tiny-text"
MAX_IMAGE_BYTES = 64 * 1024
FETCH_TIMEOUT = 1.5


# -- images ---------------------------------------------------------------------------------------------
def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A few solid blocks: few colours (exact in GIF's palette) and distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    for y in range(0, h, 8):
        for x in range(0, w, 8):
            pixels[y : y + 8, x : x + 8] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


RED = encode(picture(1), "PNG")
BLUE = encode(picture(2), "PNG")
NOISE = encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 200, 3), dtype=np.uint8)), "PNG")


# -- a local HTTP server for URL images --------------------------------------------------------------------
class _Images(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes]] = {
        "/red.png": ("image/png", RED),
        "/red-untyped": ("application/octet-stream", RED),
        "/page.html": ("text/html", b"<html>not an image</html>"),
        "/big.png": ("image/png", NOISE),
        "/text-as-png": ("image/png", b"plain text pretending"),
    }

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/slow.png":
            time.sleep(FETCH_TIMEOUT + 1.5)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/red.png")
            self.end_headers()
            return
        kind, body = self.routes.get(self.path, ("image/png", RED) if self.path == "/slow.png" else (None, b""))
        if kind is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the server gave up on it, as it should
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images_url():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# -- a server with the tiny vision model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv(tmp_path_factory, gguf_path):
    root = tmp_path_factory.mktemp("vision")
    lm, projector = vision_fixture.build(root / "files", gguf_path)
    server = start_server(root / "models", root / "server.log", CORRAL_NO_BUNDLED="1",
                          CORRAL_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES), CORRAL_IMAGE_FETCH_TIMEOUT=str(FETCH_TIMEOUT))
    with httpx.Client(base_url=server.url, timeout=120) as api:
        digests = {}
        for path in (lm, projector):
            data = path.read_bytes()
            digests[path.name] = "sha256:" + hashlib.sha256(data).hexdigest()
            assert api.post(f"/api/blobs/{digests[path.name]}", content=data).status_code in (200, 201)
        files = {lm.name: digests[lm.name], projector.name: digests[projector.name]}
        for name, chosen in ((MODEL, files), (TEXT_MODEL, {lm.name: digests[lm.name]})):
            r = api.post("/api/create", json={"model": name, "files": chosen, "stream": False})
            assert r.status_code == 200, r.text
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def api(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(srv):
    return OpenAI(base_url=srv.url + "/v1/", api_key="ollama", max_retries=0, timeout=120)


def ask(oai: OpenAI, *parts, model: str = MODEL, **kw):
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    kw = {"temperature": 0, "max_tokens": 4, "logprobs": True, "top_logprobs": 5, **kw}
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def signature(reply) -> list:
    """What greedy decoding produced and how sure it was, rounded so equal inputs compare equal."""
    return [(c.token, round(c.logprob, 3), [(t.token, round(t.logprob, 3)) for t in c.top_logprobs])
            for c in reply.choices[0].logprobs.content]


def bad(api: httpx.Client, content: list, model: str = MODEL) -> dict:
    r = api.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                               "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400, r.text
    return r.json()["error"]


# -- the model -------------------------------------------------------------------------------------------
def test_show_lists_the_vision_capability(api):
    assert "vision" in api.post("/api/show", json={"model": MODEL}).json()["capabilities"]
    assert "vision" not in api.post("/api/show", json={"model": TEXT_MODEL}).json()["capabilities"]


def test_an_image_changes_the_output_and_the_same_image_repeats_it(oai):
    first = ask(oai, "Describe", image(data_url(RED)))
    again = ask(oai, "Describe", image(data_url(RED)))
    other = ask(oai, "Describe", image(data_url(BLUE)))
    without = ask(oai, "Describe", "")
    assert signature(first) == signature(again)
    assert signature(first) != signature(other)
    assert signature(first) != signature(without)
    assert first.choices[0].message.content == again.choices[0].message.content


def test_prompt_tokens_grow_by_the_image_tokens(oai):
    base = ask(oai, "Describe", "").usage.prompt_tokens  # the same text, joined the same way
    one = ask(oai, "Describe", image(data_url(RED))).usage.prompt_tokens
    assert one == base + vision_fixture.IMAGE_TOKENS
    two = ask(oai, "Describe", image(data_url(RED)), image(data_url(BLUE))).usage.prompt_tokens
    newline = 1  # the second image part is joined to the first with "\n"
    assert two == one + newline + vision_fixture.IMAGE_TOKENS


def test_images_across_messages_and_a_repeated_prompt_reuses_its_cache(oai):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "First"}, image(data_url(RED))]},
        {"role": "assistant", "content": "Seen."},
        {"role": "user", "content": [image(data_url(BLUE)), {"type": "text", "text": "and this?"}]},
    ]
    one = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3)
    two = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3)
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.usage.prompt_tokens == two.usage.prompt_tokens > 2 * vision_fixture.IMAGE_TOKENS
    # The whole prompt but its last token comes from the cache, both images included.
    assert two.usage.prompt_tokens_details.cached_tokens == two.usage.prompt_tokens - 1


def test_an_image_seen_again_is_not_encoded_again(srv, oai):
    fresh = encode(picture(41), "PNG")
    key = hashlib.sha256(fresh).hexdigest()[:12]
    log = Path(srv.log)
    ask(oai, "Look", image(data_url(fresh)))
    # Another prefix before the same image: the cache cannot be reused, the encoding can.
    oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=2, messages=[
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}, image(data_url(fresh))]}])
    assert log.read_text().count(f"encoded image {key}") == 1


def test_identical_pixels_in_every_format_give_identical_outputs(oai):
    picture_ = picture(7)
    png = ask(oai, "Describe", image(data_url(encode(picture_, "PNG"))))
    for fmt, mime, options in (("WEBP", "image/webp", {"lossless": True}), ("GIF", "image/gif", {}),
                               ("BMP", "image/bmp", {})):
        reply = ask(oai, "Describe", image(data_url(encode(picture_, fmt, **options), mime)))
        assert signature(reply) == signature(png), fmt
    jpeg = ask(oai, "Describe", image(data_url(encode(picture_, "JPEG", quality=90), "image/jpeg")))
    assert jpeg.usage.prompt_tokens == png.usage.prompt_tokens


def test_an_animated_gif_is_read_from_its_first_frame(oai):
    first, second = picture(8), picture(9)
    out = io.BytesIO()
    first.save(out, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    animated = ask(oai, "Describe", image(data_url(out.getvalue(), "image/gif")))
    still = ask(oai, "Describe", image(data_url(encode(first, "PNG"))))
    assert signature(animated) == signature(still)


def test_url_images_are_fetched(oai, images_url):
    by_url = ask(oai, "Describe", image(f"{images_url}/red.png"))
    by_data = ask(oai, "Describe", image(data_url(RED)))
    assert signature(by_url) == signature(by_data)
    redirected = ask(oai, "Describe", image(f"{images_url}/redirect"))
    assert signature(redirected) == signature(by_data)


def test_the_bare_string_form_of_image_url(oai, images_url):
    reply = ask(oai, "Describe", {"type": "image_url", "image_url": f"{images_url}/red.png"})
    assert signature(reply) == signature(ask(oai, "Describe", image(data_url(RED))))
    reply = ask(oai, "Describe", {"type": "image_url", "image_url": data_url(BLUE)})
    assert signature(reply) == signature(ask(oai, "Describe", image(data_url(BLUE))))


def test_streaming_and_several_choices_with_an_image(oai):
    plain = ask(oai, "Describe", image(data_url(BLUE)), max_tokens=5, logprobs=False, top_logprobs=None)
    stream = oai.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Describe"}, image(data_url(BLUE))]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    several = ask(oai, "Describe", image(data_url(BLUE)), n=2, max_tokens=5, logprobs=False, top_logprobs=None)
    assert [c.message.content for c in several.choices] == [plain.choices[0].message.content] * 2


def test_native_chat_takes_base64_images(api, oai):
    reply = api.post("/api/chat", json={
        "model": MODEL, "stream": False, "options": {"temperature": 0, "num_predict": 4},
        "messages": [{"role": "user", "content": "Describe", "images": [base64.b64encode(RED).decode()]}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    same = ask(oai, "Describe", image(data_url(RED)), logprobs=False, top_logprobs=None)
    assert body["message"]["content"] == same.choices[0].message.content
    assert body["prompt_eval_count"] == same.usage.prompt_tokens


def test_native_generate_takes_base64_images(api, oai):
    body = {"model": MODEL, "prompt": "Describe", "stream": False, "options": {"temperature": 0, "num_predict": 4},
            "images": [base64.b64encode(RED).decode()]}
    reply = api.post("/api/generate", json=body)
    assert reply.status_code == 200, reply.text
    same = ask(oai, "Describe", image(data_url(RED)), logprobs=False, top_logprobs=None)
    assert reply.json()["response"] == same.choices[0].message.content
    assert reply.json()["prompt_eval_count"] == same.usage.prompt_tokens
    assert "context" not in reply.json()  # image positions are not tokens a later request could send back
    raw = api.post("/api/generate", json={**body, "raw": True})
    assert raw.status_code == 400 and "images" in raw.json()["error"]


# -- errors ----------------------------------------------------------------------------------------------
def test_an_image_for_a_model_without_vision_names_the_model(api):
    err = bad(api, [{"type": "text", "text": "hi"}, image(data_url(RED))], model=TEXT_MODEL)
    assert TEXT_MODEL in err["message"] and "vision" in err["message"]
    assert err["param"] == "messages[0].content"


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,!!!not base64!!!", "not valid base64"),
    ("data:image/png,rawbytes", "must be base64"),
    ("data:image/png;base64", "no ','"),
    (data_url(b"hello, I am text", "text/plain"), "not an image"),
    (data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "not an image"),
    (data_url(RED[: len(RED) // 2]), "could not be decoded"),
    (data_url(encode(picture(5), "TIFF"), "image/tiff"), "TIFF images are not supported"),
    (data_url(NOISE), "more than"),
    ("file:///etc/passwd", "file: URLs are not supported"),
    ("ftp://example.com/cat.png", "ftp: URLs are not supported"),
    ("cat.png", "is not an image URL"),
])
def test_bad_images_are_400s_that_say_why(api, url, words):
    err = bad(api, [{"type": "text", "text": "hi"}, image(url)])
    assert words in err["message"]
    assert err["param"] == "messages[0].content[1]"


@pytest.mark.parametrize("path, words", [
    ("/missing.png", "HTTP 404"),
    ("/page.html", "is not an image (its Content-Type is text/html)"),
    ("/red-untyped", "application/octet-stream"),
    ("/big.png", "more than"),
    ("/text-as-png", "not an image"),
    ("/slow.png", "timed out"),
])
def test_bad_url_images_are_400s_that_say_why(api, images_url, path, words):
    err = bad(api, [image(f"{images_url}{path}")])
    assert words in err["message"]
    assert err["param"] == "messages[0].content[0]"


def test_an_unreachable_url_is_a_400(api):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = bad(api, [image(f"http://127.0.0.1:{port}/cat.png")])
    assert "could not fetch" in err["message"]


def test_image_tokens_count_against_the_context(api):
    r = api.post("/v1/chat/completions", json={
        "model": MODEL, "num_ctx": 20,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image(data_url(RED))]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_the_second_bad_image_is_named(api):
    err = bad(api, [image(data_url(RED)), {"type": "text", "text": "and"}, image("file:///etc/hosts")])
    assert err["param"] == "messages[0].content[2]"


def test_the_server_keeps_serving_after_bad_images(oai, api):
    bad(api, [image(data_url(RED[:100]))])
    assert ask(oai, "Describe", image(data_url(RED))).choices[0].finish_reason in ("length", "stop")


def test_the_openai_client_raises_bad_request(oai):
    with pytest.raises(BadRequestError) as info:
        ask(oai, "Describe", image("file:///etc/passwd"))
    assert "file: URLs are not supported" in str(info.value)


def test_the_javascript_client_sends_both_forms(srv, oai, images_url):
    root = Path(__file__).resolve().parent.parent
    if shutil.which("node") is None or not (root / "node_modules" / "openai").is_dir():
        pytest.fail("node and the npm openai package are required (make test installs them)")
    env = {**os.environ, "CORRAL_BASE_URL": srv.url + "/v1/", "CORRAL_MODEL": MODEL,
           "CORRAL_IMAGE_DATA_URL": data_url(BLUE), "CORRAL_IMAGE_URL": f"{images_url}/red.png"}
    out = subprocess.run(["node", "examples/vision.mjs"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    blue = ask(oai, "Describe", image(data_url(BLUE)), logprobs=False, top_logprobs=None)
    red = ask(oai, "Describe", image(data_url(RED)), logprobs=False, top_logprobs=None)
    assert (result["object"], result["objectPromptTokens"]) == (blue.choices[0].message.content,
                                                               blue.usage.prompt_tokens)
    assert (result["string"], result["stringPromptTokens"]) == (red.choices[0].message.content,
                                                               red.usage.prompt_tokens)
