"""The web playground in a real browser: headless Chromium types a message, the page streams the
reply from /v1/chat/completions, and a screenshot of the exchange is saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from test_server import start_server, stop_server

CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("FASTLLM_REQUIRE_BROWSER") == "1"

if not CHROMEDRIVER or not shutil.which("chromium"):
    if REQUIRED:
        raise RuntimeError("FASTLLM_REQUIRE_BROWSER=1 but chromium/chromedriver are missing")
    pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

selenium = pytest.importorskip("selenium", reason="selenium is not installed")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

SCREENSHOT_DIR = Path(os.environ.get("FASTLLM_ARTIFACTS", "build/artifacts"))


def test_playground_streams_a_reply_in_chromium():
    proc, base = start_server(["--max-model-len", "1024", "--quantized-weights", "dequantize",
                               "--disable-log-stats"])
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(base + "/")
        WebDriverWait(driver, 30).until(
            lambda d: "SmolLM2" in d.find_element(By.ID, "model").text)
        temperature = driver.find_element(By.ID, "temp")
        temperature.clear()
        temperature.send_keys("0")
        box = driver.find_element(By.ID, "input")
        box.send_keys("What is the capital of France?")
        box.send_keys(Keys.ENTER)
        WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state='done']")
            or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        user = driver.find_element(By.CSS_SELECTOR, ".msg.user").text
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant").text
        assert user == "What is the capital of France?"
        assert "Paris" in reply
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOT_DIR / "playground.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
        stop_server(proc)
