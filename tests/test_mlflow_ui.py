"""A person's view: the MLflow UI, served by `mlflow server` over the workflow's store, in Chromium.

Opens the experiments page and finds one experiment per phase, the filter run's dataset and funnel chart,
then a training run's artifacts and sees its sample image rendered (an <img> that actually loaded).
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

import helpers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PHASES = ["filter", "download", "encoders", "precompute", "train", "evaluate"]

pytestmark = [
    pytest.mark.e2e,
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


def test_mlflow_ui_shows_every_phase_and_a_training_sample_image(mlflow_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, data_root = mlflow_server
    browser.get(f"{url}/#/experiments")
    body = lambda: browser.find_element(By.TAG_NAME, "body").text  # noqa: E731
    for phase in PHASES:
        wait_for(lambda: f"wurst-{phase}" in body(), what=f"experiment wurst-{phase} listed")

    # The evaluation's metrics (the attribute probe), on its run page.
    (evaluation, *_) = tracking.find_runs("evaluate", tracking_uri=f"sqlite:///{data_root}/mlflow.db")
    browser.get(f"{url}/#/experiments/{evaluation.info.experiment_id}/runs/{evaluation.info.run_id}")
    wait_for(lambda: "probe/colour" in body(), what="the evaluation's probe metrics on its run page")

    # The filter run: its output dataset listed on the run page (MLflow's dataset tracking), and its funnel chart
    # rendered from the report/ artifacts.
    (filter_run, *_) = tracking.find_runs("filter", tracking_uri=f"sqlite:///{data_root}/mlflow.db")
    from PIL import Image

    client = helpers.mlflow_client(data_root)
    logged = {d.dataset.name: d.dataset.digest for d in client.get_run(filter_run.info.run_id).inputs.dataset_inputs}
    assert f"filter/{filter_run.data.tags['wurst.version']}" in logged and len(logged) == 2  # output + input
    browser.get(f"{url}/#/experiments/{filter_run.info.experiment_id}/runs/{filter_run.info.run_id}")
    # The run page lists its datasets as "<name> (<digest>)" under Datasets (the first, "+1" for the other).
    wait_for(lambda: "Datasets" in body() and any(f"{n} ({d[:8]})" in body() for n, d in logged.items()),
             what="the filter's datasets on its run page")
    local = client.download_artifacts(filter_run.info.run_id, "report/funnel.png", dst_path=str(tmp_path / "f"))
    funnel_width = Image.open(local).size[0]
    browser.get(f"{url}/#/experiments/{filter_run.info.experiment_id}/runs/{filter_run.info.run_id}/artifacts")
    click = lambda xpath: browser.find_elements(By.XPATH, xpath)[-1].click() or True  # noqa: E731
    wait_for(lambda: click("//*[normalize-space(text())='report']"), what="report folder in the artifact tree")
    wait_for(lambda: click("//*[normalize-space(text())='funnel.png']"), what="funnel.png listed")

    def loaded_width():
        for img in browser.find_elements(By.TAG_NAME, "img"):
            if (img.get_attribute("src") or "").startswith("blob:"):
                return browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        return None

    assert wait_for(loaded_width, what="the funnel chart rendered") == funnel_width

    # A training run that logged a sample grid: open its Artifacts tab the way a person does
    # (click the images folder, then the PNG) and check the preview <img> really loaded that image.
    samples = []
    for run in tracking.find_runs("train", tracking_uri=f"sqlite:///{data_root}/mlflow.db"):
        samples += [(run, a.path) for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert samples, "no training run logged a sample image"
    run, png = samples[0]
    local = client.download_artifacts(run.info.run_id, png, dst_path=str(tmp_path))
    width = Image.open(local).size[0]

    browser.get(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts")
    wait_for(lambda: click("//*[normalize-space(text())='images']"), what="images folder in the artifact tree")
    name = os.path.basename(png)
    wait_for(lambda: click(f"//*[starts-with(normalize-space(text()), '{name[:40]}')]"), what=f"{name} listed")
    assert wait_for(loaded_width, what=f"sample image {png} rendered") == width
