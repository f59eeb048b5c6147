"""Image to image: SDEdit on the generator's own schedule, in the sampler, the pipeline and the server.

The pipeline tests use the bundled 4-step digits generator (pixel space) and a tiny SD-shaped
generator (VAE latents); the server tests a real ``python -m dmd2_serve`` on loopback.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from dmd2_kernels.renoise import philox_normal_reference
from PIL import Image
from serving import Server, jpeg_quality_table, start_server, stop_server

from dmd2_serve import BUNDLED_DIGITS_GENERATOR
from dmd2_serve.model.adapters import load_backbone, load_unet
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_serve.model.sampling import add_noise, few_step_sample, philox_sample, sdedit_start
from dmd2_serve.model.schedule import Schedule
from dmd2_serve.server.api import pixels
from dmd2_serve.server.encoding import encode_image
from dmd2_serve.server.images import load_image

PROMPTS, SEEDS = ["a handwritten 7", "the number three"], [5, 2**32 - 1]


# ------------------------------------------------------------------------------------- helpers

def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def start_picture() -> bytes:
    """A 24x16 RGB PNG (not the model's size, shape or channels: it is fitted and made grey)."""
    rng = np.random.default_rng(0)
    return png(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def counting(pipe: FewStepPipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the timestep of every UNet evaluation of ``pipe`` (until the test ends)."""
    calls: list[int] = []
    denoise = pipe.denoise

    def counted(x_t, t, cond):
        calls.append(int(t[0]))
        return denoise(x_t, t, cond)

    monkeypatch.setattr(pipe, "denoise", counted)
    return calls


def by_hand(pipe: FewStepPipeline, prompts: list[str], seeds: list[int], x0: torch.Tensor, k: int) -> torch.Tensor:
    """SDEdit written out with the sampling functions: x0 noised to t_k with stream k, then the
    loop's last steps with streams k+1.. as re-noise draws (the reference numbers of the kernel)."""
    seeds_t = torch.tensor(seeds)
    n = x0[0].numel()

    def z(stream: int) -> torch.Tensor:
        return philox_normal_reference(seeds_t, stream, n).reshape(x0.shape)

    timesteps = pipe.timesteps
    t_k = torch.full((len(seeds),), timesteps[k])
    x_t = add_noise(x0, z(k), t_k, pipe.schedule.alphas_cumprod)
    cond = pipe.backbone.encode_prompts(prompts)
    x0_out = few_step_sample(lambda x, t: pipe.denoise(x, t, cond), x_t, pipe.schedule.with_timesteps(timesteps[k:]),
                             [z(s) for s in range(k + 1, len(timesteps))])
    return pipe.backbone.decode(x0_out)


@pytest.fixture(scope="module")
def digits() -> FewStepPipeline:
    return FewStepPipeline.from_folder(BUNDLED_DIGITS_GENERATOR)


# ------------------------------------------------------------------------------------- sampler

def test_strength_selects_the_last_steps():
    assert [sdedit_start(s, 4) for s in (1.0, 0.75, 0.5, 0.25, 0.1, 0.6)] == [0, 1, 2, 3, 3, 2]
    assert sdedit_start(0.01, 2) == 1 and sdedit_start(0.74, 2) == 1  # at least one step runs
    assert sdedit_start(1.0, 1) == sdedit_start(1.0, 2) == 0  # from noise, as asked
    # every step would run from noise: the image was dropped without a word
    with pytest.raises(ValueError, match="strength 0.75 with 2 steps runs every step, from pure noise, so the image"
                                         " would go unused; give a strength below 0.75"):
        sdedit_start(0.75, 2)
    with pytest.raises(ValueError, match="image to image needs 2 steps or more"):
        sdedit_start(0.01, 1)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sdedit_start(bad, 4)


def test_philox_sample_from_an_image_is_the_loop_tail():
    abar = torch.linspace(0.9999, 0.0047, 1000, dtype=torch.float64).float()
    schedule = Schedule(abar, timesteps=(999, 749, 499, 249))
    calls: list[int] = []

    def eps_fn(x_t, t):
        calls.append(int(t[0]))
        return torch.tanh(x_t) * (t.float().reshape(-1, 1, 1, 1) / 1000)

    seeds, x0 = torch.tensor([3, 9]), torch.rand(2, 1, 4, 4) * 2 - 1
    got = philox_sample(eps_fn, seeds, (1, 4, 4), schedule, x0_start=x0, start_step=2)
    assert calls == [499, 249]
    z = [philox_normal_reference(seeds, s, 16).reshape(2, 1, 4, 4) for s in range(4)]
    x_t = add_noise(x0, z[2], torch.full((2,), 499), abar)
    want = few_step_sample(eps_fn, x_t, schedule.with_timesteps((499, 249)), [z[3]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs x0_start"):
        philox_sample(eps_fn, seeds, (1, 4, 4), schedule, start_step=1)


# ------------------------------------------------------------------------------------ pipeline

def test_strength_half_runs_the_last_two_of_four_steps(digits: FewStepPipeline, monkeypatch: pytest.MonkeyPatch):
    image = pixels(load_image(start_picture(), (8, 8), 1), 1).repeat(2, 1, 1, 1)  # (2, 1, 8, 8) in [0, 1]
    calls = counting(digits, monkeypatch)
    got = digits(PROMPTS, SEEDS, image=image, strength=0.5)
    assert len(digits.timesteps) == 4 and calls == list(digits.timesteps[2:])
    want = by_hand(digits, PROMPTS, SEEDS, image * 2 - 1, 2)  # digits: UNet space is the pixels in [-1, 1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    calls.clear()
    plain = digits(PROMPTS, SEEDS)
    assert torch.equal(digits(PROMPTS, SEEDS, image=image, strength=1.0), plain)  # strength 1: from noise
    assert calls == list(digits.timesteps) * 2
    assert (got - plain).abs().max() > 0.05  # the image mattered
    with pytest.raises(ValueError, match="pass image too"):
        digits(PROMPTS, SEEDS, strength=0.5)


def test_same_image_request_same_pixels_whatever_the_batch(digits: FewStepPipeline):
    image = pixels(load_image(start_picture(), (8, 8), 1), 3)
    others = torch.rand(4, 1, 8, 8)
    alone = digits.generate_padded(["a 4"] * 3, [7, 8, 9], bucket=8, image=image, strength=0.5)
    crowd = digits.generate_padded(["a 1", "a 2", "a 4", "a 4", "a 4", "a 5", "a 6"], [1, 2, 7, 8, 9, 3, 4], bucket=8,
                                   image=torch.cat([others[:2], image, others[2:]]), strength=0.5)
    assert torch.equal(alone, crowd[2:5])


def test_tiny_sd_generator_starts_from_the_encoded_image(sd15_teacher: Path, monkeypatch: pytest.MonkeyPatch):
    pipe = FewStepPipeline(load_unet(sd15_teacher).eval().requires_grad_(False), load_backbone(sd15_teacher),
                           (999, 749, 499, 249))
    image = pixels(load_image(start_picture(), (16, 16), 3), 2)
    x0 = pipe.encode_images(image)
    assert x0.shape == (2, *pipe.backbone.sample_shape)
    assert torch.equal(x0, pipe.encode_images(image))  # the mean of the VAE's distribution: deterministic
    calls = counting(pipe, monkeypatch)
    got = pipe(["a red cube", "a small dog"], [3, 4], image=image, strength=0.25)
    assert calls == [249] and got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, by_hand(pipe, ["a red cube", "a small dog"], [3, 4], x0, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        pipe(["a red cube"], [3], image=image[:1, :1], strength=0.5)


# -------------------------------------------------------------------------------------- server

def generate(server: Server, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=body, timeout=timeout)


def decoded(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def test_server_image_to_image_is_the_pipeline(server: Server, digits: FewStepPipeline):
    picture = start_picture()
    r = generate(server, prompt="a handwritten 7", seed=11, num_images=2, image=b64(picture), strength=0.5)
    assert r.status_code == 200, r.text
    got = [decoded(im["data"]) for im in r.json()["images"]]
    start = pixels(load_image(picture, (8, 8), 1), 2)
    want = digits.generate_padded(["a handwritten 7"] * 2, [11, 12], bucket=8, image=start, strength=0.5)
    for g, w in zip(got, want):
        expected = np.asarray(Image.open(io.BytesIO(encode_image(w, "png", (8, 8)))))
        # the server's own thread count may round a GEMM differently: at most one grey level
        assert np.abs(g.astype(int) - expected.astype(int)).max() <= 1
    # strength 1 is text to image; a data: URL works as well as bare base64
    plain = generate(server, prompt="a handwritten 7", seed=11).json()["images"]
    one = generate(server, prompt="a handwritten 7", seed=11, image="data:image/png;base64," + b64(picture),
                   strength=1.0)
    assert one.json()["images"] == plain


def test_server_same_request_same_pixels_in_any_batch(server: Server):
    picture = b64(start_picture())
    target = {"prompt": "a drawing of a five", "seed": 1234, "num_images": 2, "image": picture, "strength": 0.5}
    alone = generate(server, **target).json()["images"]
    strengths = (0.25, 0.5, 0.75, 1.0)
    others = [{"prompt": f"the digit {d}", "seed": d, "num_images": 1 + d % 3,
               **({"image": picture, "strength": strengths[d // 2 % 4]} if d % 2 else {})} for d in range(11)]
    bodies = others[:5] + [target] + others[5:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: generate(server, **b), bodies))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    assert results[5].json()["images"] == alone
    assert max(r.json()["timings_ms"]["batch_requests"] for r in results) > 1, "no batching happened"


def test_openai_client_edits_unchanged(server: Server, tmp_path: Path):
    import openai

    path = tmp_path / "start.png"
    path.write_bytes(start_picture())
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with open(path, "rb") as f:
        result = client.images.edit(image=f, prompt="a handwritten 4", n=2, size="64x64", response_format="b64_json")
    assert len(result.data) == 2 and all(decoded(d.b64_json).shape == (64, 64) for d in result.data)
    with open(path, "rb") as f, open(path, "rb") as m, pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=f, mask=m, prompt="a 4", response_format="b64_json")
    assert e.value.status_code == 400 and e.value.param == "mask" and "inpainting is not supported yet" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("x.png", b"not an image"), prompt="a 4")
    assert e.value.param == "image"
    with open(path, "rb") as f, pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=f, prompt="a 4", size="1024x1000")
    assert e.value.param == "size"
    with open(path, "rb") as f:  # a list of one sends image[]
        listed = client.images.edit(image=[f], prompt="a handwritten 4", size="64x64")
    assert decoded(listed.data[0].b64_json).shape == (64, 64)
    with open(path, "rb") as f, open(path, "rb") as g, pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=[f, g], prompt="a 4")
    assert e.value.param == "image" and "2 images were sent" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # the image given to the route that draws from noise
        client.images.generate(prompt="a 4", extra_body={"strength": 0.5})
    assert e.value.param == "strength" and "/v1/images/edits" in str(e.value)
    assert client.images.generate(prompt="a 4", extra_body={"image": None, "strength": None}).data  # null: none
    url = f"{server.url}/v1/images/edits"
    for form, files, param, words in [
        ({"prompt": "a 4"}, {"image": (None, "photo.png")}, "image", "must be a file part"),  # a text field
        ({"prompt": ""}, {"image": ("a.png", start_picture())}, "prompt", "an empty form field counts as none"),
        ({"prompt": "a 4"}, {"picture": ("a.png", start_picture())}, "image", "send the image to start from"),
        ({"prompt": "a 4", "n": "1_0"}, {"image": ("a.png", start_picture())}, "n", "is not a whole number"),
        ({"prompt": "a 4", "sed": "3"}, {"image": ("a.png", start_picture())}, "sed", "did you mean 'seed'?"),
        ({"prompt": "a 4", "background": "transparent"}, {"image": ("a.png", start_picture())}, "background",
         "a transparent background is not supported"),
        ({"prompt": "a 4"}, {"image": ("a.png", start_picture()), "markup": ("m.png", start_picture())}, "markup",
         "not supported yet"),  # OpenAI's guided edit: it was ignored
        ({"prompt": "a 4"}, [("image", ("a.png", start_picture())), ("mask[]", ("m.png", start_picture()))], "mask",
         "inpainting is not supported yet"),  # a list of masks: it was ignored, the whole image redrawn
        ({"prompt": "a 4"}, [("image", ("a.png", start_picture())), ("image", ("b.png", start_picture()))], "image",
         "2 images were sent"),  # the last one was taken
    ]:
        r = httpx.post(url, data=form, files=files, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (form, r.text)
        assert words in r.json()["error"]["message"], r.text
    gpt_image = {"prompt": "a 4", "size": "64x64", "quality": "high", "input_fidelity": "high", "user": "u",
                 "svg[model]": "m"}  # OpenAI's own models' parameters: taken, ignored
    r = httpx.post(url, data=gpt_image, files={"image": ("a.png", start_picture())}, timeout=30)
    assert r.status_code == 200 and r.json()["size"] == "64x64" and r.json()["output_format"] == "png", r.text
    small = {"prompt": "a 4", "output_format": "jpeg", "output_compression": "30"}  # a form's digits
    r = httpx.post(url, data=small, files={"image": ("a.png", start_picture())}, timeout=30)
    jpeg = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert jpeg.format == "JPEG" and jpeg.quantization[0] == jpeg_quality_table(30), r.text


def truncated_png() -> bytes:
    data = png(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return data[: len(data) // 2]


def damaged_header_png() -> bytes:
    data = bytearray(png(np.zeros((8, 8, 3), np.uint8)))
    data[29] ^= 0xFF  # inside IHDR: its CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize("body, field, words", [
    ({"image": "this is not base64!"}, "image", "base64"),
    ({"image": b64(b"GIF89a not a png at all")}, "image", "not a PNG, JPEG or WebP"),
    ({"image": b64(truncated_png())}, "image", "truncated"),
    ({"image": b64(damaged_header_png())}, "image", "starts as a PNG file but could not be read"),
    ({"image": b64(png_claiming(100_000, 100_000))}, "image", "pixels"),
    ({"image": b64(png_claiming(5000, 4000))}, "image", "5000 x 4000"),
    ({"image": ""}, "image", "empty"),
    ({"image": b64(start_picture()), "size": "12x12"}, "size", "not supported"),
    ({"image": b64(start_picture()), "strength": 0}, "strength", "greater than 0"),
    ({"image": b64(start_picture()), "strength": 1.5}, "strength", "less than or equal to 1"),
    ({"strength": 0.5}, "strength", "send image too"),
    ({"image": b64(start_picture()), "steps": 1}, "image", (
        "the default strength 0.75 with 1 step runs every step, from pure noise, so the image would go unused; image"
        " to image needs 2 steps or more, or strength 1 to draw from noise alone; or ask for more steps (this model"
        " runs up to 4)")),
    ({"image": b64(start_picture()), "steps": 2, "strength": 0.8}, "strength", "give a strength below 0.75"),
])
def test_bad_images_are_422_naming_the_field(server: Server, body, field, words):
    r = httpx.post(f"{server.url}/generate", json={"prompt": "a 1", **body}, timeout=30)
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if field in [str(p) for p in e["loc"]]]
    assert errors and words in errors[0]["msg"], r.text


def test_image_over_the_body_limit_is_413_naming_the_limit(server: Server):
    big = b64(b"\0" * (7 * 2**20))  # 9.3 MiB of base64, over the default 8 MiB
    r = generate(server, prompt="a 1", image=big)
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"] and "--max-body-mb" in r.text
    assert "an input image is most of a body" in r.text
    r = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "a 1"},
                   files={"image": ("big.png", b"\0" * (9 * 2**20), "image/png")}, timeout=60)
    assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]["message"]
    assert server.process.poll() is None and httpx.get(f"{server.url}/health").status_code == 200


@pytest.fixture(scope="module")
def sd_generator(sd15_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-shaped generator folder: the tiny teacher's UNet exported on the 4-step schedule."""
    from dmd2_train.export import export_generator

    unet = load_unet(sd15_teacher)
    return export_generator(unet.state_dict(), unet.config, load_backbone(sd15_teacher), sd15_teacher,
                            tmp_path_factory.mktemp("sdgen") / "generator", [999, 749, 499, 249])


def test_tiny_sd_server_image_to_image(sd_generator: Path):
    s = start_server("--model", str(sd_generator), "--bucket", "2")
    try:
        r = generate(s, prompt="a red cube", seed=3, num_images=2, image=b64(start_picture()), strength=0.5)
        assert r.status_code == 200, r.text
        images = [decoded(im["data"]) for im in r.json()["images"]]
        assert all(im.shape == (16, 16, 3) for im in images) and not np.array_equal(images[0], images[1])
        plain = generate(s, prompt="a red cube", seed=3, num_images=2).json()["images"]
        assert [decoded(im["data"]).tolist() for im in plain] != [im.tolist() for im in images]
    finally:
        stop_server(s)
