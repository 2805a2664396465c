"""A person's view: the MLflow UI, served by `mlflow server` over the workflow's store, in Chromium.

Opens the experiments page and finds one experiment per phase, then opens a training run's
artifacts and sees its sample image rendered (an <img> that actually loaded).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from cluster.local import free_ports
from pipelines import tracking

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PHASES = ["filter", "download", "encoders", "precompute", "train"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow_e2e,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="Debian's chromium + chromium-driver are not installed (.ci/run installs them)"),
]


@pytest.fixture
def mlflow_server(demo_workflow_run):
    data_root = demo_workflow_run["data_root"]
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{data_root}/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not start")
        yield url, data_root
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(predicate, timeout=90, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - the page is still rendering
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def test_mlflow_ui_shows_every_phase_and_a_training_sample_image(mlflow_server, browser):
    from selenium.webdriver.common.by import By

    url, data_root = mlflow_server
    browser.get(f"{url}/#/experiments")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    for phase in PHASES:
        wait_for(lambda: f"wurst-{phase}" in body(), what=f"experiment wurst-{phase} listed")

    # A training run that logged a sample grid: open its artifacts and look at the image.
    runs = tracking.find_runs("train", tracking_uri=f"sqlite:///{data_root}/mlflow.db")
    run = next(r for r in runs if r.data.tags.get("wurst.stage") in ("c", None) or True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{data_root}/mlflow.db")

    def image_paths(path=""):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            if item.is_dir:
                out += image_paths(item.path)
            elif item.path.endswith(".png"):
                out.append(item.path)
        return out

    images = image_paths()
    assert images, "the training run logged no sample image"
    browser.get(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/{images[0]}")

    def loaded_image():
        for img in browser.find_elements(By.TAG_NAME, "img"):
            src = img.get_attribute("src") or ""
            if "artifact" in src and browser.execute_script(
                    "return arguments[0].complete && arguments[0].naturalWidth > 0", img):
                return src
        return None

    src = wait_for(loaded_image, what=f"sample image {images[0]} rendered")
    assert src
