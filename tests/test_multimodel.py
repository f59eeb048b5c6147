"""Several generators in one server, and LoRA adapters per request.

One real ``python -m dmd2_serve`` on loopback serves three models: the bundled digits generator,
``sd`` (the tiny SD-shaped teacher's UNet on a one-step schedule: the base) and ``sdA`` (the LoRA
export A itself, its adapter kept beside the teacher's weights). ``sd`` and ``sdA`` take adapters
from one folder: A and B (random LoRAs of the same teacher), and adapters that must be refused.
Every served image is compared with the pipeline that has that model or adapter loaded alone.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import Server, start_server, stop_server
from test_lora import export_random_lora

from dmd2_serve import BUNDLED_DIGITS_GENERATOR
from dmd2_serve.model.adapters import load_backbone, load_unet
from dmd2_serve.model.lora import LORA_WEIGHTS
from dmd2_serve.model.pipeline import FewStepPipeline

BUCKET = 2


@dataclasses.dataclass
class Made:
    base: Path  # the sd15 teacher's UNet as a one-step generator
    a: Path  # LoRA exports of that teacher (random B, seeds 1 and 2)
    b: Path
    loras: Path  # the adapter folder the server reads


@pytest.fixture(scope="module")
def made(sd15_teacher: Path, sdxl_teacher: Path, sd2v_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Made:
    from safetensors.torch import load_file, save_file

    from dmd2_train.export import export_generator

    root = tmp_path_factory.mktemp("multimodel")
    unet = load_unet(sd15_teacher)
    base = export_generator(unet.state_dict(), unet.config, load_backbone(sd15_teacher), sd15_teacher, root / "base",
                            [999])
    loras = root / "loras"
    for name, teacher, seed in (("A", sd15_teacher, 1), ("B", sd15_teacher, 2), ("xl", sdxl_teacher, 1),
                                ("sd2", sd2v_teacher, 1)):
        folder, _ = export_random_lora(teacher, root / name, seed)
        shutil.copytree(folder / "lora", loras / name)
    # sd2: an SD2-shaped adapter whose card claims eps-prediction, so that only its shapes give it away
    card = json.loads((loras / "sd2" / "dmd2.json").read_text())
    (loras / "sd2" / "dmd2.json").write_text(json.dumps({**card, "prediction_type": "epsilon"}))
    # broken: a weights file that is not safetensors; unpaired: one lora_B of the wrong rank
    shutil.copytree(loras / "A", loras / "broken")
    (loras / "broken" / LORA_WEIGHTS).write_bytes(b"not a safetensors file")
    shutil.copytree(loras / "A", loras / "unpaired")
    tensors = load_file(loras / "A" / LORA_WEIGHTS)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, loras / "unpaired" / LORA_WEIGHTS)
    # nan: fits the model, one value NaN (a run that diverged): found when loaded, not from the header
    shutil.copytree(loras / "A", loras / "nan")
    tensors = load_file(loras / "A" / LORA_WEIGHTS)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, loras / "nan" / LORA_WEIGHTS)
    # nocard: the weights without their dmd2.json (a LoRA from elsewhere looks like this)
    shutil.copytree(loras / "A", loras / "nocard")
    (loras / "nocard" / "dmd2.json").unlink()
    return Made(base, root / "A" / "lora", root / "B" / "lora", loras)


@pytest.fixture(scope="module")
def server(made: Made):
    s = start_server("--model", f"digits={BUNDLED_DIGITS_GENERATOR}", "--model", f"sd={made.base}",
                     "--model", f"sdA={made.a}", "--lora-dir", f"sd={made.loras}", "--lora-dir", f"sdA={made.loras}",
                     "--lora-cache", "1", "--bucket", str(BUCKET), "--max-batch-size", "16", "--batch-timeout", "0.1")
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def pipes(made: Made) -> dict[str, FewStepPipeline]:
    """Each model or adapter loaded alone, as the library loads it (a LoRA export: fused)."""
    return {"digits": FewStepPipeline.from_folder(BUNDLED_DIGITS_GENERATOR), "sd": FewStepPipeline.from_folder(made.base),
            "A": FewStepPipeline.from_folder(made.a), "B": FewStepPipeline.from_folder(made.b)}


def pixels_of(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) uint8, as the server's PNG holds it."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def expected(pipe: FewStepPipeline, prompt: str, seed: int) -> np.ndarray:
    return pixels_of(pipe.generate_padded([prompt], [seed], bucket=BUCKET)[0])


def served(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one grey level (the server's thread count may round a GEMM differently)."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def generate(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=body, timeout=120)


def metric(server: Server, sample: str) -> float:
    """The value of one exposition line, e.g. ``dmd2_lora_loads_total{model="sd"}`` (0 if absent)."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


# ----------------------------------------------------------------------------------- several models


def test_each_request_gets_its_models_images(server: Server, pipes: dict[str, FewStepPipeline]):
    digits, sd = generate(server, prompt="a handwritten 7", seed=5), generate(server, prompt="a red cube", seed=5, model="sd")
    assert digits.json()["model"] == "digits" and sd.json()["model"] == "sd"  # no model: the first one
    assert same(served(digits), expected(pipes["digits"], "a handwritten 7", 5))
    assert same(served(sd), expected(pipes["sd"], "a red cube", 5))
    assert served(digits).shape == (8, 8) and served(sd).shape == (16, 16, 3)
    named = generate(server, prompt="a handwritten 7", seed=5, model="digits")
    assert served(named).tolist() == served(digits).tolist()


def test_models_are_listed_in_openais_shape(server: Server):
    import openai

    listing = httpx.get(f"{server.url}/v1/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["digits", "sd", "sdA"]
    assert all(m["object"] == "model" and m["owned_by"] == "dmd2-fast" and isinstance(m["created"], int)
               for m in listing["data"])
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["digits", "sd", "sdA"]
    assert client.models.retrieve("sd").id == "sd"
    info = httpx.get(f"{server.url}/info").json()["model"]
    assert info["model"] == "digits" and [m["name"] for m in info["models"]] == ["digits", "sd", "sdA"]


def test_openapi_schema_lists_the_new_fields_and_endpoints(server: Server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/models", "/v1/models/{model_id}"} <= set(schema["paths"])
    shapes = schema["components"]["schemas"]
    for request in ("GenerateRequest", "OpenAIImagesRequest"):
        assert {"model", "lora", "lora_scale"} <= set(shapes[request]["properties"]), request
    assert "404" in schema["paths"]["/generate"]["post"]["responses"]


def test_unknown_model_is_404_in_openais_shape(server: Server):
    import openai

    for r in (generate(server, prompt="a 1", model="dall-e-3"),
              httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a 1", "model": "dall-e-3"}),
              httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "a 1", "model": "dall-e-3"},
                         files={"image": ("a.png", b"\x89PNG", "image/png")}),
              httpx.get(f"{server.url}/v1/models/dall-e-3")):
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["param"] == "model" and error["code"] == "model_not_found"
        assert error["type"] == "invalid_request_error" and "digits, sd, sdA" in error["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a 1", response_format="b64_json")
    assert e.value.code == "model_not_found" and "leave model out for digits" in str(e.value)  # a ported app's way


def test_concurrent_mixed_requests_each_get_their_own_images(server: Server, pipes: dict[str, FewStepPipeline]):
    kinds = [({}, "digits"), ({"model": "sd"}, "sd"), ({"model": "sd", "lora": "A"}, "A"),
             ({"model": "sd", "lora": "B"}, "B"), ({"model": "sdA"}, "A"), ({"model": "sdA", "lora": "B"}, "B")]
    bodies = [({"prompt": f"picture {i}", "seed": 100 + i, **extra}, ref) for i in range(12)
              for extra, ref in [kinds[i % len(kinds)]]]
    before = metric(server, 'dmd2_model_requests_total{lora="",model="digits"}')
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: generate(server, **b[0]), bodies))
    for (body, ref), r in zip(bodies, results):
        assert same(served(r), expected(pipes[ref], body["prompt"], body["seed"])), (body, ref)
        assert r.json()["model"] == body.get("model", "digits")
    timings = [r.json()["timings_ms"] for r in results]
    assert max(t["batch_requests"] for t in timings) > 1, "no batching happened"
    # a forward group holds one (model, adapter): at most the 2 requests of each kind
    assert all(1 <= t["group_requests"] <= 2 for t in timings), timings
    assert metric(server, 'dmd2_model_requests_total{lora="",model="digits"}') == before + 2
    assert metric(server, 'dmd2_model_requests_total{lora="B",model="sdA"}') >= 2
    assert 'dmd2_model_inference_seconds_count{model="sd"}' in httpx.get(f"{server.url}/metrics").text


# ----------------------------------------------------------------------------------- LoRA per request


def test_lora_requests_equal_the_adapter_loaded_alone(server: Server, pipes: dict[str, FewStepPipeline]):
    prompt, seed = "a small dog", 9
    want = {name: expected(pipes[name], prompt, seed) for name in ("sd", "A", "B")}
    assert all(np.abs(want[x].astype(int) - want[y].astype(int)).max() > 8 for x, y in [("sd", "A"), ("sd", "B"),
                                                                                         ("A", "B")])
    for body, ref in [({"model": "sd", "lora": "A"}, "A"), ({"model": "sd", "lora": "B"}, "B"),
                      ({"model": "sd"}, "sd"), ({"model": "sd", "lora": "A", "lora_scale": 0}, "sd"),
                      ({"model": "sdA"}, "A"), ({"model": "sdA", "lora": "B"}, "B"),
                      ({"model": "sdA", "lora": "A", "lora_scale": 0}, "sd")]:
        assert same(served(generate(server, prompt=prompt, seed=seed, **body)), want[ref]), body
    r = generate(server, prompt=prompt, seed=seed, model="sd", lora="A", lora_scale=0.5)
    half = served(r)
    assert not same(half, want["sd"]) and not same(half, want["A"])
    made_by = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))).text["parameters"]
    assert made_by.endswith("Model: sd, Lora: A, Lora scale: 0.5"), made_by  # the file says which adapter made it
    r = generate(server, prompt=prompt, seed=seed, model="sd", lora="A", lora_scale=0)  # the model alone
    made_by = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))).text["parameters"]
    assert made_by.endswith("Model: sd"), made_by
    # a LoRA export served as the model: scale 0 is its teacher alone, not the model, and its file says so
    r = generate(server, prompt=prompt, seed=seed, model="sdA", lora="A", lora_scale=0)
    made_by = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["data"]))).text["parameters"]
    assert made_by.endswith("Model: sdA, Lora: A, Lora scale: 0"), made_by
    # the OpenAI route takes the same fields (extra_body in the official client)
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": prompt, "model": "sd", "lora": "B"})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1


def test_lru_of_one_adapter_reloads_and_stays_right(server: Server, pipes: dict[str, FewStepPipeline]):
    """--lora-cache 1: each switch between A and B on one model loads again; repeats do not."""
    loads = 'dmd2_lora_loads_total{model="sd"}'
    served(generate(server, prompt="x", seed=1, model="sd", lora="B"))  # B loaded: A's next request loads again
    before = metric(server, loads)
    for name in ("A", "A", "B", "A"):
        got = served(generate(server, prompt="a city at night", seed=3, model="sd", lora=name))
        assert same(got, expected(pipes[name], "a city at night", 3)), name
    assert metric(server, loads) == before + 3


@pytest.mark.parametrize("body, field, words", [
    ({"lora": "C"}, "lora", "no LoRA adapter named 'C'"),
    ({"lora": "xl"}, "lora", "family 'sdxl'"),
    ({"lora": "sd2"}, "lora", "another base"),
    ({"lora": "broken"}, "lora", "not a readable safetensors file"),
    ({"lora": "unpaired"}, "lora", "do not pair"),
    ({"lora": "nan"}, "lora", "holds NaN or infinite values"),
    ({"lora": "nocard"}, "lora", "has pytorch_lora_weights.safetensors but no dmd2.json"),
    ({"lora": "../loras/A"}, "lora", "pattern"),
    ({"lora": "A", "lora_scale": 2.5}, "lora_scale", "less than or equal to 2"),
    ({"lora_scale": 0.5}, "lora_scale", "send lora too"),
])
def test_bad_adapters_are_422_naming_the_field(server: Server, body, field, words):
    r = generate(server, prompt="a 1", model="sd", **body)
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if field in [str(p) for p in e["loc"]]]
    assert errors and words in errors[0]["msg"], r.text


def test_adapter_problems_on_the_openai_routes_and_models_without_adapters(server: Server):
    r = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a 1", "model": "sd", "lora": "xl"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
    r = generate(server, prompt="a 1", lora="A")  # the digits model has no --lora-dir
    assert r.status_code == 422 and "--lora-dir digits=DIR" in r.text


# ----------------------------------------------------------------------------------- in process


def test_pipeline_switches_adapters_beside_the_weights(made: Made, pipes: dict[str, FewStepPipeline]):
    prompts, seeds = ["a red cube", "a small dog"], [4, 5]
    pipe = FewStepPipeline.from_folder(made.base)
    pipe.loras.capacity = 1
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for folder, ref in [(made.a, "A"), (made.b, "B"), (None, "sd"), (made.a, "A")]:
        pipe.use_lora(folder)
        got = pipe.generate_padded(prompts, seeds, bucket=BUCKET)
        torch.testing.assert_close(got, pipes[ref].generate_padded(prompts, seeds, bucket=BUCKET), atol=1e-5, rtol=0)
    assert pipe.loras.loaded == [made.a]  # capacity 1: B went when A came back
    pipe.use_lora(None)
    base = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if ".lora_" not in k}
    assert base.keys() == weights.keys() and all(torch.equal(v, weights[k]) for k, v in base.items())
    # a LoRA export kept unfused: its own adapter by default, another in its place on request
    own = FewStepPipeline.from_folder(made.a, fuse_lora=False)
    torch.testing.assert_close(own.generate_padded(prompts, seeds, bucket=BUCKET),
                               pipes["A"].generate_padded(prompts, seeds, bucket=BUCKET), atol=1e-5, rtol=0)
    own.use_lora(made.b)
    torch.testing.assert_close(own.generate_padded(prompts, seeds, bucket=BUCKET),
                               pipes["B"].generate_padded(prompts, seeds, bucket=BUCKET), atol=1e-5, rtol=0)
    # folded upsamplers would leave an adapter on their convolutions out: refused either way round
    from dmd2_serve.model.backends import BackendError, FastPath

    with pytest.raises(BackendError, match="serve LoRA adapters without --subpixel-upsample"):
        own.accelerate(FastPath(subpixel_upsample=True))
    with pytest.raises(BackendError, match="holds LoRA adapters: --backend compile bakes .* --backend eager"):
        own.accelerate(FastPath(backend="compile"))
    folded = FewStepPipeline.from_folder(made.base)
    folded.accelerate(FastPath(subpixel_upsample=True))
    with pytest.raises(BackendError, match="serve LoRA adapters without --subpixel-upsample"):
        folded.use_lora(made.a)


def test_an_adapter_exported_again_into_its_folder_is_loaded_anew(made: Made, pipes: dict[str, FewStepPipeline],
                                                                  tmp_path: Path):
    """The cache kept serving the first export's weights after the folder's file was replaced."""
    prompts, seeds = ["a red cube"], [4]
    folder = shutil.copytree(made.a, tmp_path / "adapter")
    pipe = FewStepPipeline.from_folder(made.base)
    pipe.use_lora(folder)
    first = pipe.generate_padded(prompts, seeds, bucket=BUCKET)
    torch.testing.assert_close(first, pipes["A"].generate_padded(prompts, seeds, bucket=BUCKET), atol=1e-5, rtol=0)
    shutil.copy(made.b / LORA_WEIGHTS, folder / LORA_WEIGHTS)  # B's weights under A's name
    pipe.use_lora(folder)
    torch.testing.assert_close(pipe.generate_padded(prompts, seeds, bucket=BUCKET),
                               pipes["B"].generate_padded(prompts, seeds, bucket=BUCKET), atol=1e-5, rtol=0)
    assert pipe.loras.loaded == [folder]


def test_adapter_that_fails_in_the_worker_fails_its_own_requests_only(made: Made, pipes: dict[str, FewStepPipeline]):
    """Files that changed after the HTTP process checked them: that group's jobs answer 422, the rest run."""
    from dmd2_serve.server.api import FewStepAPI, JobFailure, JobResult
    from dmd2_serve.server.encoding import to_pixels
    from dmd2_serve.server.schemas import GenerateRequest

    api = FewStepAPI({"sd": made.base}, lora_dirs={"sd": made.loras}, bucket=BUCKET)
    api.pipes = {"sd": FewStepPipeline.from_folder(made.base)}  # what setup() loads, without binding this process
    good = api.prepare(GenerateRequest(prompt="a red cube", seed=1, model="sd", lora="A"))
    bad = dataclasses.replace(good, lora="broken", lora_folder=made.loras / "broken")
    answers = [api.encode_response(r) for r in api.unbatch(api.predict(api.batch([good, bad])))]
    assert isinstance(answers[0], JobResult) and answers[0].images.shape[0] == 1
    assert api.file(answers[0], 0).startswith(b"\x89PNG")  # the HTTP process makes the file from the pixels
    assert isinstance(answers[1], JobFailure) and answers[1].field == "lora" and "'broken'" in answers[1].message
    plain = api.predict([api.prepare(GenerateRequest(prompt="a red cube", seed=1, model="sd"))])[0]
    want = to_pixels(pipes["sd"].generate_padded(["a red cube"], [1], bucket=BUCKET))
    # the failed load left the UNet as it was (uint8 pixels: a float rounding can move one by 1)
    assert plain.images.dtype == np.uint8 and plain.images.shape == want.shape
    assert np.abs(plain.images.astype(int) - want.numpy().astype(int)).max() <= 1


def test_lora_dirs_are_checked_at_start(made: Made, tmp_path: Path):
    from dmd2_serve.model.backends import FastPath
    from dmd2_serve.server.api import FewStepAPI

    for kwargs, words in [({"lora_dirs": {"sd": made.loras}, "fast": FastPath(backend="compile")}, "--backend eager"),
                          ({"lora_dirs": {"other": made.loras}}, "not served"),
                          ({"lora_dirs": {"sd": tmp_path / "missing"}}, "is not a folder"),
                          ({"lora_dirs": {"sd": made.loras}, "fast": FastPath(subpixel_upsample=True)},
                           "--subpixel-upsample folds the upsamplers' weights once"),
                          ({"lora_cache": 0}, "at least 1")]:
        with pytest.raises(ValueError, match=words):
            FewStepAPI({"sd": made.base}, **kwargs)
    r = subprocess.run([sys.executable, "-m", "dmd2_serve", "--model", f"x={made.base}", "--model", f"x={made.a}"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: two models are named 'x'") and "Traceback" not in r.stderr


def test_model_specs_on_the_command_line(tmp_path: Path):
    from dmd2_serve.__main__ import _lora_dirs, _named_folder, _served

    odd = tmp_path / "a=b"
    odd.mkdir()
    assert _named_folder("sd=/m/sd15") == ("sd", Path("/m/sd15"))
    assert _named_folder("/m/sd15") == (None, Path("/m/sd15"))
    assert _named_folder(str(odd)) == (None, odd)  # an existing folder is taken whole
    for bad in ("=/m/sd15", "my model=/m/sd15", "a="):  # said as such, not "folder '=/m/sd15' does not exist"
        with pytest.raises(argparse.ArgumentTypeError, match="is neither a folder nor NAME=DIR"):
            _named_folder(bad)
    assert _served([(None, Path("/m/gen")), ("xl", Path("/m/xl"))]) == {"gen": Path("/m/gen"), "xl": Path("/m/xl")}
    assert _lora_dirs([(None, Path("/l"))], {"gen": Path("/m/gen"), "xl": Path("/m/xl")}) == {"gen": Path("/l")}
    with pytest.raises(ValueError, match="two --lora-dir"):
        _lora_dirs([(None, Path("/l")), ("gen", Path("/k"))], {"gen": Path("/m/gen")})
