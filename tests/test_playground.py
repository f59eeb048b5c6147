"""The playground page end to end in headless Chromium (Debian's chromium + chromium-driver)."""

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


NEEDS_CHROMIUM = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


def chromium(tmp_path: Path):
    """Headless Chromium whose profile lives in the test's own tmp_path (pytest prunes it; /tmp does not)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
                 # an air-gapped host: no name resolves but the server's loopback address (a page that
                 # fetched a script from a CDN would break here, wherever the tests run)
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)


@NEEDS_CHROMIUM
def test_playground_generates_images_in_a_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path)
    try:
        driver.get(server.url + "/")
        assert not driver.find_element(By.ID, "key-box").is_displayed()  # no --api-key: no field
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("the number three")
        driver.find_element(By.ID, "seed").send_keys("77")
        count = driver.find_element(By.ID, "num_images")
        count.clear()
        count.send_keys("3")
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 3)
        images = driver.find_elements(By.CSS_SELECTOR, "img.result")
        WebDriverWait(driver, 10).until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images))
        assert [i.get_attribute("alt") for i in images] == [f"the number three (seed {s})" for s in (77, 78, 79)]
        first = images[0].get_attribute("src").split(",", 1)[1]
        assert Image.open(io.BytesIO(base64.b64decode(first))).size == (8, 8)
        assert "3 image(s)" in driver.find_element(By.ID, "status").text
        # image to image: a file through the drop zone's input, a strength, and the result comes back
        start = tmp_path / "start.png"
        Image.new("L", (32, 32), 200).save(start)
        assert driver.find_element(By.ID, "strength").get_attribute("disabled")  # no image yet
        driver.find_element(By.ID, "image").send_keys(str(start))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "image-preview").is_displayed())
        driver.execute_script("const s = document.getElementById('strength'); s.value = '0.5';"
                              " s.dispatchEvent(new Event('input'));")
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: "from your image (strength 0.5)" in d.find_element(By.ID, "status").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "img.result")) == 3
        driver.save_screenshot(str(tmp_path / "playground.png"))  # the page as it ended, for a look by hand
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def key_server():
    """The bundled generator behind --api-key s3cret."""
    from serving import start_server, stop_server

    server = start_server("--api-key", "s3cret")
    yield server
    stop_server(server)
    assert "s3cret" not in Path(server.log_path).read_text()  # the old ?key=... went into the access log


@NEEDS_CHROMIUM
def test_playground_asks_for_the_api_key_and_keeps_it_out_of_the_url(key_server, tmp_path):
    """Its only way was ?key=... in the address, which the access log then held."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver = key_server, chromium(tmp_path)
    try:
        driver.get(server.url + "/#key=s3cret")  # a link with the key: kept in the tab, taken off the address
        assert driver.current_url.rstrip("/") == server.url
        assert driver.find_element(By.ID, "key").get_attribute("value") == "s3cret"
        driver.find_element(By.ID, "key").clear()
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 30).until(lambda d: "asks for an API key" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "key").send_keys("s3cret")
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "img.result")) == 4)
    finally:
        driver.quit()


@NEEDS_CHROMIUM
def test_docs_work_offline_and_try_it_out_sends_the_key(key_server, tmp_path):
    """/docs and /redoc on a host without internet (this one: FastAPI's pages fetched their scripts from
    cdn.jsdelivr.net and stayed blank): Swagger UI lists the routes, its Authorize takes the API key and
    "Try it out" on /generate answers 200; ReDoc shows the same schema."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, driver = key_server, chromium(tmp_path)
    try:
        driver.get(server.url + "/docs")
        assert "cdn.jsdelivr.net" not in driver.page_source
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "operations-default-generate_generate_post"))
        assert "dmd2-serve" in driver.find_element(By.CSS_SELECTOR, ".info .title").text
        driver.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
        driver.find_element(By.CSS_SELECTOR, ".modal-ux input").send_keys("s3cret")
        driver.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper .authorize").click()
        driver.find_element(By.CSS_SELECTOR, ".modal-ux .btn-done").click()
        operation = driver.find_element(By.ID, "operations-default-generate_generate_post")
        operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        WebDriverWait(driver, 10).until(lambda d: operation.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
        operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
        # the body it starts from is the schema's example (without one: every field, "model": "string" too, a 404)
        body = operation.find_element(By.CSS_SELECTOR, "textarea.body-param__text").get_attribute("value")
        assert json.loads(body) == {"prompt": "a lighthouse at dusk", "num_images": 1, "seed": 42}
        operation.find_element(By.CSS_SELECTOR, ".execute").click()
        status = ".live-responses-table tr.response .response-col_status"
        WebDriverWait(driver, 60).until(lambda d: operation.find_elements(By.CSS_SELECTOR, status))
        assert operation.find_element(By.CSS_SELECTOR, status).text.strip() == "200"
        assert "Bearer s3cret" in operation.find_element(By.CSS_SELECTOR, ".curl-command").text
        driver.get(server.url + "/redoc")
        WebDriverWait(driver, 30).until(lambda d: "/generate" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()


def test_docs_assets_are_served_and_the_key_is_in_the_schema_only_with_one(server, key_server):
    """Without a browser: the pages point at the server's own files, which it serves; the bearer scheme
    is declared where a key is required, on the generation routes alone."""
    import httpx

    for page, asset in (("/docs", "/docs-assets/swagger-ui-bundle.js"), ("/redoc", "/docs-assets/redoc.standalone.js")):
        html = httpx.get(server.url + page).text
        assert asset in html and "cdn.jsdelivr.net" not in html and "fonts.googleapis.com" not in html
        answer = httpx.get(server.url + asset)
        assert answer.status_code == 200 and "javascript" in answer.headers["content-type"] and len(answer.content) > 10**5
    assert "securitySchemes" not in httpx.get(server.url + "/openapi.json").json().get("components", {})
    schema = httpx.get(key_server.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the server's --api-key"}}
    secured = {path for path, ops in schema["paths"].items() for op in ops.values() if op.get("security")}
    assert secured == {"/generate", "/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/models/{model_id}",
                       "/info"}
    assert schema["info"]["title"] == "dmd2-serve"
