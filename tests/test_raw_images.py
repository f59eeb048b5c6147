"""Image files out: made once in the worker, sent as they are for ``Accept: image/*`` or base64'd
into JSON, and saying what made them (A1111's ``parameters``) unless ``--no-metadata``.

The server tests run a real ``python -m dmd2_serve`` on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from serving import Server, jpeg_quality_table, start_server, stop_server

from dmd2_serve.server.encoding import USER_COMMENT_UNICODE, Parameters, encode_image, raw_format, to_pixels


def generate(server: Server, accept: str | None = None, **body) -> httpx.Response:
    headers = {"Accept": accept} if accept else None
    return httpx.post(f"{server.url}/generate", json=body, headers=headers, timeout=60)


def files(response: httpx.Response) -> list[bytes]:
    """The image files of a JSON answer."""
    assert response.status_code == 200, response.text
    return [base64.b64decode(image["data"]) for image in response.json()["images"]]


def user_comment(data: bytes) -> str | None:
    """The EXIF UserComment of a JPEG or WebP as A1111 writes it (UTF-16 after ``UNICODE\\0``)."""
    with Image.open(io.BytesIO(data)) as im:
        comment = im.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if comment is None:
        return None
    assert comment.startswith(USER_COMMENT_UNICODE)
    return comment[len(USER_COMMENT_UNICODE):].decode("utf-16-be")


def png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return dict(im.text)


# ------------------------------------------------------------------------------------- the server

def test_raw_png_is_the_json_image_byte_for_byte(server: Server):
    body = {"prompt": "a handwritten 7", "seed": 42, "size": "64x64"}
    raw = generate(server, "image/png", **body)
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert int(raw.headers["content-length"]) == len(raw.content)
    (from_json,) = files(generate(server, **body))
    assert raw.content == from_json  # one file, made once: the JSON route base64s the same bytes
    with Image.open(io.BytesIO(raw.content)) as a, Image.open(io.BytesIO(from_json)) as b:
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


def test_accept_picks_the_format_made_in_the_worker(server: Server):
    """``Accept`` wins over ``output_format`` (as before); the file is made in that format, not converted."""
    jpeg = generate(server, "image/jpeg", prompt="a 3", seed=1, output_format="png")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert jpeg.content == files(generate(server, prompt="a 3", seed=1, output_format="jpeg"))[0]
    webp = generate(server, "text/html, image/png;q=0.5, image/webp;q=0.9", prompt="a 3", seed=1)
    assert webp.headers["content-type"] == "image/webp"  # the heavier of the two
    assert webp.content == files(generate(server, prompt="a 3", seed=1, output_format="webp"))[0]
    any_image = generate(server, "image/*", prompt="a 3", seed=1, output_format="jpeg")
    assert any_image.headers["content-type"] == "image/jpeg" and any_image.content == jpeg.content
    refused = generate(server, "text/html", prompt="a 3")
    assert refused.status_code == 406 and "Accept: application/json" in refused.json()["detail"]
    for answer in (jpeg, webp, any_image, refused, generate(server, prompt="a 3")):  # JSON too
        assert answer.headers["vary"] == "Accept"  # a shared cache keeps the file and the JSON apart
    many = generate(server, "image/png", prompt="a 3", num_images=2)
    assert many.status_code == 406 and "num_images=1" in many.json()["detail"]
    bad = generate(server, "image/png", prompt="a 3", num_images=2, steps=99)  # a bad field is still a 422 first
    assert bad.status_code == 422


def test_png_says_what_made_it(server: Server):
    raw = generate(server, "image/png", prompt="a handwritten 7", seed=42, steps=2, size="64x64").content
    assert png_text(raw) == {"parameters": "a handwritten 7\nSteps: 2, Sampler: DMD2, Seed: 42, Size: 64x64,"
                                           " Model: digits-generator"}
    pair = files(generate(server, prompt="naïve 七, a 1", seed=7, num_images=2))  # each image its own seed
    for data, seed in zip(pair, (7, 8)):
        assert png_text(data)["parameters"] == (
            f"naïve 七, a 1\nSteps: 4, Sampler: DMD2, Seed: {seed}, Size: 8x8, Model: digits-generator")


def test_jpeg_and_webp_say_it_in_exif_and_image_to_image_gives_its_strength(server: Server):
    start = base64.b64encode(generate(server, "image/png", prompt="a 3", seed=1).content).decode()
    for fmt in ("jpeg", "webp"):
        r = generate(server, prompt="the number eight", seed=5, output_format=fmt, image=start, strength=0.5)
        assert user_comment(files(r)[0]) == ("the number eight\nSteps: 4, Sampler: DMD2, Seed: 5, Size: 8x8,"
                                              " Model: digits-generator, Denoising strength: 0.5")


@pytest.fixture(scope="module")
def bare():
    s = start_server("--no-metadata")
    yield s
    stop_server(s)


def test_no_metadata_writes_none(bare: Server, server: Server):
    raw = generate(bare, "image/png", prompt="a handwritten 7", seed=42).content
    assert png_text(raw) == {}
    # without metadata, a seed the server picked was lost: the file answer says it in X-Seed, OpenAI's in data
    picked = generate(bare, "image/png", prompt="a handwritten 7")
    seed = int(picked.headers["x-seed"])
    assert generate(bare, "image/png", prompt="a handwritten 7", seed=seed).content == picked.content
    import openai

    client = openai.OpenAI(base_url=f"{bare.url}/v1", api_key="unused", max_retries=0)
    first, second = client.images.generate(prompt="a handwritten 7", n=2).data
    again = files(generate(bare, prompt="a handwritten 7", seed=first.seed, num_images=2))
    assert second.seed == first.seed + 1
    assert again == [base64.b64decode(first.b64_json), base64.b64decode(second.b64_json)]
    with_text = generate(server, "image/png", prompt="a handwritten 7", seed=42).content
    with Image.open(io.BytesIO(raw)) as a, Image.open(io.BytesIO(with_text)) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the same pixels, without the text
    for fmt in ("jpeg", "webp"):
        assert user_comment(files(generate(bare, prompt="a 1", seed=1, output_format=fmt))[0]) is None


def test_openapi_documents_the_raw_answers(server: Server):
    responses = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/generate"]["post"]["responses"]
    assert set(responses["200"]["content"]) == {"application/json", "image/png", "image/jpeg", "image/webp"}
    assert "406" in responses and "422" in responses


# ------------------------------------------------------------------------------------- units

def test_middleware_passes_answers_through_untouched():
    """The raw-image detour is gone: the middleware neither parses nor re-encodes what the route sends."""
    from dmd2_serve.server.lifecycle import ServingState
    from dmd2_serve.server.middleware import ServingMiddleware

    answer = b"\x89PNG\r\n\x1a\n neither JSON nor a whole image"

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]})
        await send({"type": "http.response.body", "body": answer})

    middleware = ServingMiddleware(app, generation_paths=("/generate",), known_paths=(), max_queue=1,
                                   state=ServingState())

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://test") as client:
            return await client.post("/generate", json={"prompt": "a 1"}, headers={"Accept": "image/png"})

    r = asyncio.run(call())
    assert r.status_code == 200 and r.content == answer and r.headers["content-type"] == "image/png"


@pytest.mark.parametrize("accept, fmt", [
    ("image/png", "png"), ("IMAGE/JPEG; q=0.5", "jpeg"), ("image/gif, image/png", "png"),
    ("application/json", None), ("*/*", None), ("", None), ("text/html, */*;q=0.8", None),
    ("image/*", "webp"),  # the request's output_format
    ("application/json, image/webp", None), ("image/webp, application/json", "webp"),  # a tie: the first listed
    ("application/json;q=0.4, image/*;q=0.5", "webp"), ("image/png;q=0, */*", None),
    ("image/*, image/webp;q=0", "png"),  # the exact range outweighs image/*
    ("image/png;q=high, image/jpeg", "jpeg"),  # a q that is no number leaves its range out
    ("foo, image/jpeg;level=1", "jpeg"), ("foo", None), ("*", None),  # no type/subtype: left out; *: */*
])
def test_raw_format_weighs_the_accept_header(accept: str, fmt: str | None):
    assert raw_format(accept, preferred="webp") == fmt


@pytest.mark.parametrize("accept", ["text/html", "image/png;q=0", "application/json;q=0, image/*;q=0"])
def test_an_accept_that_takes_no_answer_is_refused(accept: str):
    from dmd2_serve.server.encoding import NotAcceptable

    with pytest.raises(NotAcceptable, match="takes none of"):
        raw_format(accept)


def test_several_images_are_json_when_the_client_takes_it():
    from dmd2_serve.server.encoding import NotAcceptable

    assert raw_format("image/png, application/json;q=0.5", one_image=False) is None  # was a 406
    assert raw_format("*/*", one_image=False) is None
    for accept in ("image/png", "image/*"):
        with pytest.raises(NotAcceptable, match="exactly one image's file; ask for num_images=1"):
            raw_format(accept, one_image=False)


def test_infotext_quotes_values_and_survives_any_prompt():
    made = Parameters("a\ud800b\0c\nsecond line", 3, 4, (8, 8), "runs/a, b: c", strength=0.25)
    text = made.infotext()
    assert text == ('a?b c\nsecond line\nSteps: 4, Sampler: DMD2, Seed: 3, Size: 8x8, Model: "runs/a, b: c",'
                    " Denoising strength: 0.25")
    image = torch.rand(1, 8, 8)
    for fmt in ("png", "jpeg", "webp"):  # a lone surrogate (valid JSON) or a NUL must not break the file
        data = encode_image(image, fmt, (16, 16), made)
        assert (png_text(data)["parameters"] if fmt == "png" else user_comment(data)) == text
    assert png_text(encode_image(image, "png", (8, 8))) == {}
    with_lora = Parameters("a cat", 3, 4, (8, 8), "sd", lora="ink", lora_scale=0.5).infotext()
    assert with_lora == "a cat\nSteps: 4, Sampler: DMD2, Seed: 3, Size: 8x8, Model: sd, Lora: ink, Lora scale: 0.5"


def test_pixels_made_before_the_copy_to_the_host_give_the_same_files():
    """The worker turns a batch into uint8 on its device before ``.cpu()``; the files are those of
    the float images, byte for byte, including values on a rounding edge and out of range."""
    images = torch.rand(2, 3, 8, 8)
    images[0, 0, 0, :4] = torch.tensor([-0.5, 1.5, 0.5 / 255, 254.5 / 255])
    pixels = to_pixels(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 8, 8, 3) and pixels.is_contiguous()
    assert pixels[0, 0, :4, 0].tolist() == [0, 255, 0, 254]  # clamped; half rounds to even
    for fmt in ("png", "jpeg", "webp"):
        for image, pix in zip(images, pixels):
            assert encode_image(pix, fmt, (16, 16)) == encode_image(image, fmt, (16, 16))
            assert encode_image(pix.numpy(), fmt, (16, 16)) == encode_image(image, fmt, (16, 16))  # as the worker sends


def test_quality_sets_jpeg_and_webp_and_png_stays_lossless():
    """``output_compression`` (OpenAI's name) is the JPEG / WebP quality; PNG has none to set."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for quality in (None, 10, 95):
        jpeg = Image.open(io.BytesIO(encode_image(pixels, "jpeg", (64, 64), quality=quality)))
        assert jpeg.quantization[0] == jpeg_quality_table(quality)
    assert jpeg_quality_table(10) != jpeg_quality_table(None)
    webp = {q: len(encode_image(pixels, "webp", (64, 64), quality=q)) for q in (5, None, 100)}
    assert webp[5] < webp[None] < webp[100], webp
    assert encode_image(pixels, "png", (64, 64), quality=5) == encode_image(pixels, "png", (64, 64))


def test_png_files_are_lossless_and_as_small_as_pillows_default():
    """The PNG deflate strategy (run-length, for speed: see ``SAVE_OPTIONS``) keeps every pixel and
    compresses a smooth image about as well as Pillow's default search."""
    rows, cols = np.mgrid[0:256, 0:256]
    smooth = np.stack([rows, cols, (rows + cols) // 2], -1).astype(np.float64)
    smooth += np.random.default_rng(0).normal(0, 2, smooth.shape)  # a little sensor-like noise
    pixels = np.clip(smooth, 0, 255).astype(np.uint8)
    data = encode_image(pixels, "png", (256, 256))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    default = io.BytesIO()
    Image.fromarray(pixels).save(default, format="PNG")
    assert len(data) < 1.05 * len(default.getvalue()), (len(data), len(default.getvalue()))
