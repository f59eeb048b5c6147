"""The HTTP server end to end: a real ``python -m dmd2_serve`` on loopback, serving the bundled generator."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import (
    Server,
    held_request,
    jpeg_quality_table,
    metric,
    queue_depth,
    raw_post,
    start_server,
    stop_server,
    wait_for,
)


def generate(server: Server, timeout: float = 60, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", json=body, timeout=timeout, headers=headers)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_health_is_503_until_every_worker_is_ready():
    # The app the server runs, in process: LitServe opens the port once one worker is ready, so
    # with two workers /health must still say 503 while the other one loads its model.
    from litserve.utils import WorkerSetupStatus

    from dmd2_serve import BUNDLED_DIGITS_GENERATOR
    from dmd2_serve.server.api import build_server

    app = build_server(BUNDLED_DIGITS_GENERATOR, accelerator="cpu", workers_per_device=2)

    def health() -> tuple[int, str]:
        async def get() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app.app), base_url="http://test") as client:
                return await client.get("/health")
        r = asyncio.run(get())
        return r.status_code, r.text

    app.workers_setup_status = {"/predict_0": WorkerSetupStatus.STARTING, "/predict_1": WorkerSetupStatus.STARTING}
    assert health() == (503, "not ready")
    app.workers_setup_status["/predict_0"] = WorkerSetupStatus.READY  # the port is open from here on
    assert health() == (503, "not ready")
    app.workers_setup_status["/predict_1"] = WorkerSetupStatus.READY
    assert health() == (200, "ok")
    app.state.stop_admitting("draining: SIGTERM received")  # and 503 again once it stops admitting
    assert health() == (503, "draining: SIGTERM received")


def test_the_ready_line_waits_for_every_worker(capsys):
    """LitServe starts the HTTP process once one worker is ready: the line said 'every worker set up'
    then, while the other still loaded its model."""
    from litserve.utils import WorkerSetupStatus

    from dmd2_serve import BUNDLED_DIGITS_GENERATOR
    from dmd2_serve.server.api import build_server
    from dmd2_serve.server.lifecycle import http_address

    app = build_server(BUNDLED_DIGITS_GENERATOR, accelerator="cpu", workers_per_device=2)
    app._address = http_address("::", 8000)  # (it printed http://:::8000)
    app.workers_setup_status = {"/predict_0": WorkerSetupStatus.READY, "/predict_1": WorkerSetupStatus.STARTING}
    announcer = threading.Thread(target=app._announce_when_ready, daemon=True)
    announcer.start()
    time.sleep(0.3)
    assert "ready on" not in capsys.readouterr().err
    app.workers_setup_status["/predict_1"] = WorkerSetupStatus.READY
    announcer.join(5)
    assert not announcer.is_alive()
    assert "dmd2_serve: ready on http://[::]:8000: serving digits-generator" in capsys.readouterr().err
    app._crash, app.workers_setup_status["/predict_1"] = "worker 0 died", WorkerSetupStatus.STARTING
    quiet = threading.Thread(target=app._announce_when_ready, daemon=True)  # stopping: a late READY is no start
    quiet.start()
    app.workers_setup_status["/predict_1"] = WorkerSetupStatus.READY
    quiet.join(5)
    assert not quiet.is_alive() and "ready on" not in capsys.readouterr().err


def test_first_health_200_means_it_serves(server: Server):
    # launch() returned at the first 200; before it the port was closed (LitServe opens it once a
    # worker is ready) or said 503. A generation request is answered at once.
    assert server.health_seen[-1] == 200 and set(server.health_seen[:-1]) <= {503}, server.health_seen
    ready = f"dmd2_serve: ready on {server.url}: serving digits-generator (every worker set up"
    wait_for(lambda: ready in Path(server.log_path).read_text(encoding="utf-8"), 5, "the ready line")  # what it serves
    assert generate(server, prompt="a 5", seed=5, timeout=20).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_generate_json(server: Server):
    r = generate(server, prompt="a handwritten 7", seed=41, num_images=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [im["seed"] for im in body["images"]] == [41, 42, 43]
    assert body["model"] == "digits-generator"
    assert {"queue", "inference", "reply", "encode"} <= set(body["timings_ms"])
    assert all(body["timings_ms"][k] >= 0 for k in ("queue", "inference", "reply", "encode"))
    assert all(decode(im["data"]).size == (8, 8) and decode(im["data"]).format == "PNG" for im in body["images"])


def test_seed_is_picked_and_returned_and_reproduces(server: Server):
    picked = generate(server, prompt="the number two").json()["images"][0]
    again = generate(server, prompt="the number two", seed=picked["seed"]).json()["images"][0]
    assert again["data"] == picked["data"]


def test_formats_sizes_and_raw_image(server: Server):
    body = generate(server, prompt="a 3", seed=1, output_format="jpeg", size="64x64").json()
    assert decode(body["images"][0]["data"]).format == "JPEG" and decode(body["images"][0]["data"]).size == (64, 64)
    small = generate(server, prompt="a 3", seed=1, output_format="jpeg", size="64x64", output_compression=10).json()
    assert decode(small["images"][0]["data"]).quantization[0] == jpeg_quality_table(10)
    assert decode(body["images"][0]["data"]).quantization[0] == jpeg_quality_table(None)
    raw_small = generate(server, prompt="a 3", seed=1, output_compression=10, headers={"Accept": "image/jpeg"})
    assert Image.open(io.BytesIO(raw_small.content)).quantization[0] == jpeg_quality_table(10)  # the file alone too
    raw = generate(server, prompt="a 3", seed=1, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(raw.content)).size == (8, 8)
    webp = generate(server, prompt="a 3", seed=1, headers={"Accept": "image/webp"})
    assert webp.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    many = generate(server, prompt="a 3", num_images=2, headers={"Accept": "image/png"})
    assert many.status_code == 406 and "num_images=1" in many.text


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "a 1", "num_images": 9}, "num_images"),
    ({"prompt": "a 1", "num_images": 0}, "num_images"),
    ({"prompt": "a 1", "seed": -1}, "seed"),
    ({"prompt": "a 1", "seed": 2**32 - 2, "num_images": 3}, "seed"),  # image i uses seed + i: the last one past 2^32-1
    ({"prompt": "a 1", "output_format": "gif"}, "output_format"),
    ({"prompt": "a 1", "output_format": "jpeg", "output_compression": 101}, "output_compression"),
    ({"prompt": "a 1", "steps": 5}, "steps"),
    ({"prompt": "a 1", "size": "12x12"}, "size"),
    ({"prompt": "a 1", "size": "huge"}, "size"),
    ({"prompt": "a 1", "size": "\uff18x\uff18"}, "size"),  # fullwidth 8x8: \d took it
    ({"prompt": "a 1", "size": "8x8\n"}, "size"),
    ({"prompt": "a 1", "colour": "red"}, "colour"),
    ({"prompt": "a 1", "seed": "42"}, "seed"),  # JSON's types as sent: no string for a number, no bool for an int
    ({"prompt": "a 1", "num_images": True}, "num_images"),
    ({"prompt": "a 1", "num_images": 2.0}, "num_images"),
    ({}, "prompt"),
])
def test_bad_requests_are_422_naming_the_field(server: Server, body, field):
    r = httpx.post(f"{server.url}/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert any(field in [str(p) for p in err["loc"]] for err in r.json()["detail"]), r.text


def test_a_body_that_is_not_json_says_so(server: Server):
    """curl -d without -H content-type sends a form: FastAPI said 'a valid dictionary or object'."""
    r = httpx.post(f"{server.url}/generate", content=b'{"prompt": "a 1"}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == (
        "/generate takes a JSON body (Content-Type: application/json), not 'application/x-www-form-urlencoded'")


def test_body_size_is_bounded(server: Server):
    r = httpx.post(f"{server.url}/generate", content=b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}',
                   headers={"content-type": "application/json"}, timeout=30)  # over the default 8 MiB
    assert r.status_code == 413


def test_same_seed_same_pixels_alone_or_in_a_full_batch(server: Server):
    target = {"prompt": "a drawing of a five", "seed": 1234, "num_images": 2}
    alone = generate(server, **target).json()["images"]
    others = [{"prompt": f"the digit {d}", "seed": d, "num_images": 1 + d % 3} for d in range(15)]
    bodies = others[:7] + [target] + others[7:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: generate(server, **b), bodies))
    assert all(r.status_code == 200 for r in results)
    assert results[7].json()["images"] == alone  # bit-identical pixels, same seeds
    assert max(r.json()["timings_ms"]["batch_requests"] for r in results) > 1, "no batching happened"


def test_openai_client_unchanged(server: Server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="digits-generator", prompt="a handwritten 4", n=2, size="64x64",
                                    response_format="b64_json")
    assert len(result.data) == 2 and all(decode(d.b64_json).size == (64, 64) for d in result.data)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a 4", response_format="url")
    assert e.value.status_code == 400 and "b64_json" in str(e.value) and e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a 4", n=9)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a 4", size="1024x1000")
    assert e.value.param == "size"


def test_openai_routes_errors_in_openai_shape_and_the_seed_extension(server: Server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    same = [client.images.generate(prompt="a 4", extra_body={"seed": 5}).data[0].b64_json for _ in range(2)]
    other = client.images.generate(prompt="a 4", extra_body={"seed": 6}).data[0].b64_json
    assert same[0] == same[1] != other  # seed, as on /generate (image i uses seed + i)
    two = client.images.generate(prompt="a 4", response_format="b64_json", extra_body={"seed": 5, "steps": 2})
    assert b"Steps: 2," in base64.b64decode(two.data[0].b64_json)  # steps too (it was dropped silently)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a 4", extra_body={"steps": 99})
    assert e.value.param == "steps"
    nulls = client.images.generate(prompt="a 4", n=None, response_format=None, extra_body={"seed": 5})  # nullable
    assert nulls.data[0].b64_json == same[0]
    with pytest.raises(openai.BadRequestError) as e:  # a Stream that yielded nothing, silently
        client.images.generate(prompt="a 4", stream=True, partial_images=1)
    assert e.value.param == "stream" and "streaming partial images is not supported" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # a typo was ignored: a random seed, silently
        client.images.generate(prompt="a 4", extra_body={"sed": 5})
    assert e.value.param == "sed" and "unknown parameter 'sed' (did you mean 'seed'?)" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:  # it was ignored: an opaque image came
        client.images.generate(prompt="a 4", extra_body={"background": "transparent"})
    assert e.value.param == "background"
    gpt_image = {"background": "opaque", "moderation": "low", "svg": {"model": "m"}}
    kept = client.images.generate(prompt="a 4", size="64x64", output_format="jpeg", quality="high", style="vivid",
                                  user="u", output_compression=80, extra_body=gpt_image)  # OpenAI's own models'
    assert (kept.output_format, kept.size, kept.background) == ("jpeg", "64x64", "opaque")  # gpt-image's fields
    assert decode(kept.data[0].b64_json).format == "JPEG"  # and its quality: output_compression was ignored
    assert decode(kept.data[0].b64_json).quantization[0] == jpeg_quality_table(80)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a 4", output_format="webp", output_compression=101)
    assert e.value.param == "output_compression"
    with pytest.raises(openai.NotFoundError) as e:  # a bare 'Not Found'
        client.images.create_variation(image=("a.png", base64.b64decode(kept.data[0].b64_json)))
    assert "image variations are not supported" in str(e.value) and "/v1/images/edits" in str(e.value)
    # /generate: null is the default too; a flood of unknown fields is one short error, not one each
    assert httpx.post(f"{server.url}/generate", json={"prompt": "a 4", "num_images": None, "output_format": None},
                      timeout=30).status_code == 200
    r = httpx.post(f"{server.url}/generate", json={"prompt": "a 4", **{f"k{i}": 0 for i in range(50_000)}}, timeout=30)
    assert r.status_code == 422 and len(r.content) < 1000 and "50,000 fields that /generate does not take" in r.text
    url = f"{server.url}/v1/images"
    cases = [  # (route, request, words in the message)
        ("generations", {"content": b'{"prompt":', "headers": {"content-type": "application/json"}},
         "the body is not valid JSON"),
        ("generations", {"json": ["a 4"]}, "the body must be a JSON object"),
        ("generations", {"data": {"prompt": "a 4"}}, "takes a JSON body (Content-Type: application/json)"),
        ("generations", {"json": {"prompt": "a 4", "seed": "5"}}, "seed: Input should be a valid integer"),
        ("generations", {"json": {"prompt": "a 4", "seed": 2**32 - 1, "n": 2}}, "with 2 images the seed is at most"),
        ("edits", {"json": {"prompt": "a 4"}}, "takes multipart/form-data"),
        ("edits", {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
         "the request body could not be read: Missing boundary"),
        ("generations", {"content": b'{"prompt": "\xff"}', "headers": {"content-type": "application/json"}},
         ("the request body could not be read: the body is not valid JSON: it is not UTF-8 text (byte 0xff at"
          " position 12)")),
        ("edits", {"data": {"prompt": "a 4", "n": "two"}, "files": {"image": b"x"}},
         "'two' is not a whole number: write it in digits"),  # our words alone (was "Value error, ...")
    ]
    for route, request, words in cases:
        r = httpx.post(f"{url}/{route}", timeout=30, **request)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (route, request, r.text)
        assert r.json()["error"]["param"] in (None, "seed", "n") and "detail" not in r.json()
        assert "Value error" not in r.text
    # /generate says what is wrong with a body that is no JSON or none (it said "JSON decode error", "Field required")
    r = httpx.post(f"{server.url}/generate", content=b'{"prompt": "x",', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith(
        "the body is not valid JSON: Expecting property name enclosed in double quotes at character 15")
    r = httpx.post(f"{server.url}/generate", timeout=30, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith("the body is empty: send a JSON object")
    # a body its parser fails on: it was a bare 400 'There was an error parsing the body', outside /generate's shape
    for body, words in [(b'{"prompt": "\xff"}', "it is not UTF-8 text (byte 0xff at position 12)"),
                        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "a number in it has over 4300 digits"),
                        (b"[" * 100_000 + b"]" * 100_000, "it is nested too deeply")]:
        r = httpx.post(f"{server.url}/generate", content=body, timeout=30, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"] == [
            {"loc": ["body"], "msg": f"the body is not valid JSON: {words}", "type": "json_invalid"}], r.text
    # a megabytes-long unknown name: difflib held the event loop for seconds over it, and the 422 sent it back whole
    long_name = "".join(chr(0x4E00 + i % 20_000) for i in range(500_000))
    r = httpx.post(f"{server.url}/generate", json={"prompt": "a 4", long_name: 1}, timeout=60)
    assert r.status_code == 422 and len(r.content) < 2000 and r.json()["detail"][0]["loc"] == ["body", long_name[:40]]
    assert f"unknown field '{long_name[:40]}'" in r.text


def test_metrics(server: Server):
    generate(server, prompt="a 1")
    httpx.get(f"{server.url}/v1/models/no-such-model")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'dmd2_requests_total{endpoint="/generate",status="200"}' in text
    assert 'dmd2_requests_total{endpoint="/v1/models/{id}",status="404"}' in text  # was "other"
    assert "dmd2_request_latency_seconds_bucket" in text
    assert "dmd2_batch_size_bucket" in text and "dmd2_queue_depth" in text


def metric_sum(server: Server, prefix: str) -> float:
    """The sum of every sample on ``/metrics`` whose line starts with ``prefix`` (0 when none)."""
    lines = httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def test_a_request_whose_client_left_is_not_run(server: Server):
    """A client that closes its connection while its request waits: the worker skips it, the metrics say 499
    (LitServe ran it, answered into the void and counted 200: a retrying client multiplied the load)."""
    run_before = metric_sum(server, "dmd2_model_requests_total{")
    skipped_before = metric_sum(server, "dmd2_cancelled_total ")
    gone_before = metric_sum(server, 'dmd2_requests_total{endpoint="/generate",status="499"}')
    with ThreadPoolExecutor(32) as pool:  # batches of 8 eight-image requests ahead of it: seconds of work
        burst = [pool.submit(generate, server, prompt=f"a {i % 10}", num_images=8) for i in range(32)]
        # (the first batches may be answered before the last of the burst comes in)
        wait_for(lambda: queue_depth(server) >= 16, 20, "the burst admitted")
        host, port = server.url.removeprefix("http://").split(":")
        body = b'{"prompt": "a 7"}'
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)  # read and queued behind the burst; then the client goes
        assert [f.result().status_code for f in burst] == [200] * 32
    wait_for(lambda: queue_depth(server) == 0, 10, "every place given back")
    assert metric_sum(server, "dmd2_model_requests_total{") == run_before + 32  # not 33
    assert metric_sum(server, "dmd2_cancelled_total ") == skipped_before + 1
    assert metric_sum(server, 'dmd2_requests_total{endpoint="/generate",status="499"}') == gone_before + 1
    assert generate(server, prompt="a 7").status_code == 200


def test_head_is_get_without_its_body(server: Server):
    """Load balancers probe with HEAD; a POST-only route still says which method it takes."""
    for path in ("/health", "/metrics", "/v1/models", "/"):
        r = httpx.head(f"{server.url}{path}", timeout=10)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
    r = httpx.head(f"{server.url}/generate", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    for answer in (httpx.get(f"{server.url}/health"), httpx.head(f"{server.url}/health")):
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"  # LitServe's "ok" had none


def test_playground_page(server: Server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and "<form" in r.text and "/generate" in r.text


def test_fuzz_with_schemathesis(server: Server):
    """Requests generated from the server's own OpenAPI schema never get a 5xx or kill it."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/generate", "/v1/images/generations", "/v1/images/edits"}
    for op in operations:
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def fuzz(case):
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:200]))

        fuzz()
    assert not failures, failures[:5]
    assert server.process.poll() is None, "the server died"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bad_model_folder_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dmd2_serve", "--model", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_a_model_folder_the_worker_could_not_load_is_one_line_at_start(tmp_path: Path):
    """A damaged weights file, a LoRA export whose teacher is gone: refused before any worker starts
    (they were a worker's tracebacks and 'One or more workers failed to start')."""
    import shutil

    from dmd2_serve import BUNDLED_DIGITS_GENERATOR

    damaged = shutil.copytree(BUNDLED_DIGITS_GENERATOR, tmp_path / "damaged")
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # cut off while copied
    orphan = shutil.copytree(BUNDLED_DIGITS_GENERATOR, tmp_path / "orphan")
    card = json.loads((orphan / "dmd2.json").read_text())
    (orphan / "dmd2.json").write_text(json.dumps({**card, "base": str(tmp_path / "moved-teacher")}))
    (orphan / "pytorch_lora_weights.safetensors").write_bytes(b"")
    for folder, words in ((damaged, "is not a readable safetensors file"), (orphan, "which is not on this machine")):
        r = subprocess.run([sys.executable, "-m", "dmd2_serve", "--model", str(folder)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error:") and words in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, env, words", [
    (["--api-key", ""], {"DMD2_API_KEY": "envkey"}, "the API key is empty"),  # served wide open before
    ([], {"DMD2_API_KEY": "s3cret-k\u00e9y"}, "printable ASCII"),  # no client could send it
    (["--timeout", "-5"], {}, "--timeout must be a positive"),
    (["--accelerator", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "torch sees no CUDA device"),  # it hung, silent
    (["--port", "80"], {}, "--port must be between 1024 and 65535, not 80"),  # LitServe's traceback, after checks
])
def test_bad_start_options_are_one_line(args: list[str], env: dict[str, str], words: str):
    r = subprocess.run([sys.executable, "-m", "dmd2_serve", *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert r.returncode == 2 and r.stderr.startswith("error:") and words in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_what_would_fail_in_a_worker_after_the_weights_load_is_one_line_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """A model folder this user may not enter, more GPUs than there are: tracebacks once the workers ran."""
    import shutil

    import torch

    from dmd2_serve import BUNDLED_DIGITS_GENERATOR
    from dmd2_serve.__main__ import main

    closed = shutil.copytree(BUNDLED_DIGITS_GENERATOR, tmp_path / "closed")
    is_file = Path.is_file

    def as_another_user(path: Path) -> bool:  # root reads mode 700 anyway: what uid 1000 meets in a container
        if closed in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", as_another_user)
    assert main(["--model", str(closed)]) == 2
    assert capsys.readouterr().err.startswith(f"error: '{closed / 'dmd2.json'}' cannot be read by this user (uid"
                                              f" {os.getuid()}): give the model folder read and search permission")
    monkeypatch.setattr(Path, "is_file", is_file)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--devices", "2", "--accelerator", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --devices 2, but torch sees 1 CUDA device(s)")


def test_a_port_in_use_is_named_before_the_model_loads_and_no_metrics_folder_is_left(tmp_path: Path):
    """uvicorn said only '[Errno 98] Address already in use' (exit 3) after the workers had loaded the
    model; every start left a /tmp/dmd2-metrics-* folder behind."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | {"TMPDIR": str(tmp_path)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dmd2_serve", "--host", "localhost", "--port", str(port)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and f"127.0.0.1:{port} is in use by another process" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("dmd2-metrics-*"))


@pytest.fixture(scope="module")
def guarded():
    s = start_server("--api-key", "s3cret")
    yield s
    stop_server(s)


def test_loadtest_sends_the_api_key(guarded: Server, capsys, monkeypatch):
    """It had no way to send one: every request was a 401, counted as an error with no word why."""
    from dmd2_serve.server.loadtest import main

    common = ["--url", guarded.url, "--clients", "1", "--seconds", "0.5", "--max-requests", "2"]
    monkeypatch.delenv("DMD2_API_KEY", raising=False)
    assert main(common) == 2 and "the first got 401" in capsys.readouterr().err
    assert main([*common, "--api-key", "s3cret"]) == 0
    monkeypatch.setenv("DMD2_API_KEY", "s3cret")  # read as the server reads it
    assert main(common) == 0


def test_api_key(guarded: Server):
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # stays open
    assert generate(guarded, prompt="a 1").status_code == 401
    assert generate(guarded, prompt="a 1", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert generate(guarded, prompt="a 1", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    import openai

    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="a 1")
    assert e.value.code == "invalid_api_key"  # OpenAI's, which clients look for
    ok = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0).images.generate(prompt="a 1")
    assert len(ok.data) == 1
    # The key before the body: a bad body without the key was a 422 that described the body (and a queue place
    # was held while it arrived); a stalled upload without the key is answered at once, its body left unread.
    started = time.monotonic()
    status, head, body = raw_post(guarded, "/generate", b'{"prompt": "x",', content_length=4096, timeout=20)
    assert status == 401 and b"www-authenticate: bearer" in head and b"connection: close" in head
    assert json.loads(body) == {"detail": "missing or wrong API key: send 'Authorization: Bearer <key>'"}
    assert time.monotonic() - started < 5  # not the --body-timeout's 30 s
    huge = 9 * 2**20  # over --max-body-mb: without the key it said 413, and so told the limit
    assert raw_post(guarded, "/generate", b"{", content_length=huge, timeout=20)[0] == 401
    assert raw_post(guarded, "/generate", b"{", content_length=huge, timeout=20,
                    headers={"Authorization": "Bearer s3cret"})[0] == 413
    answer = httpx.post(f"{guarded.url}/v1/images/generations", content=b"{not json", timeout=10,
                        headers={"content-type": "application/json", "authorization": "Bearer wrong"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    # LitServe's /info is behind the key too, and the schema says so (Swagger UI's Try it out sends the key)
    assert httpx.get(f"{guarded.url}/info").status_code == 401
    info = httpx.get(f"{guarded.url}/info", headers={"Authorization": "Bearer s3cret"})
    assert info.status_code == 200 and info.json()["model"]["model"] == "digits-generator"


@pytest.fixture(scope="module")
def cramped():
    s = start_server("--max-queue", "2", "--max-batch-size", "1")
    yield s
    stop_server(s)


def burst(server: Server, count: int) -> list[httpx.Response]:
    """``count`` simultaneous 8-image requests."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: generate(server, prompt=f"a {i % 10}", num_images=8), range(count)))


def test_full_queue_is_503_with_retry_after(cramped: Server):
    release = threading.Event()
    rejected_before = metric(cramped, "dmd2_rejected_total")
    with ThreadPoolExecutor(2) as pool:
        try:
            held = [pool.submit(held_request, cramped, {"prompt": f"a {i}", "seed": i}, release) for i in range(2)]
            wait_for(lambda: queue_depth(cramped) == 2, 20, "two requests admitted (--max-queue 2)")
            over = [generate(cramped, prompt="a 3", seed=3, timeout=10) for _ in range(3)]
            openai = httpx.post(f"{cramped.url}/v1/images/generations", json={"prompt": "a 3"}, timeout=10)
            health = httpx.get(f"{cramped.url}/health", timeout=10)
        finally:
            release.set()
        admitted = [f.result() for f in held]
    assert [r.status_code for r in over] == [503] * 3, [r.text for r in over]
    assert all(r.headers["retry-after"] == "1" and "queue limit (2 requests)" in r.json()["detail"] for r in over)
    assert openai.status_code == 503 and "queue limit" in openai.json()["error"]["message"]
    assert health.status_code == 200  # busy is not unhealthy: a full queue must not get the pod restarted
    assert metric(cramped, "dmd2_rejected_total") == rejected_before + 4
    assert [r.status_code for r in admitted] == [200, 200], [r.text for r in admitted]
    wait_for(lambda: queue_depth(cramped) == 0, 10, "the queue empty once they were answered")
    assert generate(cramped, prompt="a 3", seed=3).status_code == 200  # and the next request is admitted
    assert cramped.process.poll() is None


@pytest.fixture(scope="module")
def hasty():
    s = start_server("--body-timeout", "1", "--max-queue", "1", "--max-body-mb", "1")
    yield s
    stop_server(s)


def test_a_stalled_upload_gets_408_and_gives_its_place_back(hasty: Server):
    """A client that stops sending its body (slowloris, a dead uplink) cannot hold a queue place for ever."""
    taken: list[int] = []

    def while_stalled() -> None:
        wait_for(lambda: queue_depth(hasty) == 1, 10, "the stalled request admitted (--max-queue 1)")
        taken.append(generate(hasty, prompt="a 1", timeout=10).status_code)

    status, head, body = raw_post(hasty, "/generate", b'{"prompt":', content_length=100, opened=while_stalled)
    assert taken == [503] and status == 408 and b"--body-timeout" in body, (taken, status, body)
    assert b"connection: close" in head  # the body's rest must not be read as the connection's next request
    wait_for(lambda: queue_depth(hasty) == 0, 5, "its place given back")
    assert generate(hasty, prompt="a 1").status_code == 200
    status, _, body = raw_post(hasty, "/v1/images/generations", b'{"prompt":', content_length=100)
    assert status == 408 and json.loads(body)["error"]["message"].startswith("the request body did not arrive whole")
    # a body trickling in (a byte every 0.2 s) is timed whole, not by its pauses: it held a place for ever
    host, port = hasty.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{".encode())
        started = time.monotonic()
        while not select.select([sock], [], [], 0.2)[0] and time.monotonic() - started < 10:
            sock.sendall(b" ")  # JSON whitespace
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4, (answer, time.monotonic() - started)
    # a body declared over --max-body-mb is refused at once, before any of it is read
    status, head, body = raw_post(hasty, "/generate", b"{", content_length=100 * 2**20, timeout=10)
    assert status == 413 and json.loads(body)["detail"][0]["loc"] == ["body"] and b"--max-body-mb" in body
    assert b"connection: close" in head
    assert hasty.process.poll() is None and queue_depth(hasty) == 0


@pytest.fixture(scope="module")
def impatient():
    s = start_server("--timeout", "0.05", "--max-batch-size", "1")
    yield s
    stop_server(s)


def test_request_waiting_too_long_is_504(impatient: Server):
    answers = burst(impatient, 10)
    codes = [r.status_code for r in answers]
    assert 504 in codes and set(codes) <= {200, 504}, codes
    late = next(r for r in answers if r.status_code == 504)  # LitServe's own said only "Request timed out"
    assert "--timeout" in late.json()["detail"] and late.headers["retry-after"] == "1", late.text
    assert impatient.process.poll() is None and httpx.get(f"{impatient.url}/health").status_code == 200


def test_loadtest_script(server: Server, capsys):
    from dmd2_serve.server.launch import free_port
    from dmd2_serve.server.loadtest import main

    assert main(["--url", server.url, "--clients", "1", "4", "--seconds", "1.5", "--max-requests", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| clients |") and "\n| 4 |" in out
    one = next(line for line in out.splitlines() if line.startswith("| 1 |")).split("|")
    p50, pipeline, overhead = (float(one[i]) for i in (4, 6, 7))
    assert 0 < pipeline < p50 and 0 < overhead < p50  # the server's model time and the rest of the latency
    queue, reply, encode = (float(v) for v in one[8].split("/"))
    assert 0 < queue + reply + encode < overhead

    # big images from the toy model: the JPEG path at 512x512 (its files are made, so they are that size)
    assert main(["--url", server.url, "--clients", "1", "--seconds", "1", "--max-requests", "3", "--format", "jpeg",
                 "--size", "512x512"]) == 0
    one = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |")).split("|")
    assert float(one[8].split("/")[2]) > 0
    assert main(["--url", server.url, "--clients", "1", "--seconds", "0.5", "--max-requests", "2",
                 "--size", "12x12"]) == 2  # the size is sent: one the model cannot draw fails every request
    assert "answered none of" in (err := capsys.readouterr().err) and "422" in err and "size" in err
    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--seconds", "1"]) == 2  # nothing listens there
    assert "the first got ConnectError" in capsys.readouterr().err
    for bad in (["--clients", "0"], ["--seconds", "-1"]):
        with pytest.raises(SystemExit) as refused:
            main(bad)
        assert refused.value.code == 2 and "is not above 0" in capsys.readouterr().err


def test_an_unknown_name_is_cut_before_it_is_compared(monkeypatch: pytest.MonkeyPatch):
    """difflib over a 2.6-million-character name took 1.5 s of the event loop, every connection waiting."""
    from dmd2_serve.server import schemas

    compared: list[str] = []
    monkeypatch.setattr(schemas, "close_names", lambda name, names: compared.append(name) or [])
    name = "\u4e00" * 2_000_000
    message = schemas.unknown_field_message(name, schemas.GenerateRequest)
    assert [len(name) for name in compared] == [64] and message.startswith(f"unknown field '{name[:40]}';")
