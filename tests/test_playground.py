"""The playground page end to end in headless Chromium (Debian's chromium + chromium-driver)."""

import base64
import io
import shutil
import tempfile

import pytest
from PIL import Image

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_playground_generates_images_in_a_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        driver.get(server.url + "/")
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
        driver.save_screenshot(str(tempfile.gettempdir()) + "/dmd2-playground.png")
    finally:
        driver.quit()
