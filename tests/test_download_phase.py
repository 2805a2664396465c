"""The download phase against real HTTP servers on loopback.

NETWORK RULE: every request in this file goes to 127.0.0.1 or 127.0.0.2 (loopback). Inputs never
contain any other address, not even to show the guard blocks it; those cases are covered by the
decision-function tests in test_netguard.py. The server on 127.0.0.2 exists only to prove the guard:
it would serve a good image, and it must never be hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines import config as config_lib  # noqa: E402
from pipelines import download, download_task, manifest, netguard, storage, tracking  # noqa: E402
from pipelines.config import ConfigError  # noqa: E402
from pipelines.phase import InputError  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 1.0  # download timeout used in these tests; the slow endpoint waits 3x longer
TEST_SETTINGS = {
    "image_size": 32, "min_image_size": 16, "timeout": TIMEOUT_S, "retries": 0, "threads_per_task": 4,
    "allowed_networks": ["127.0.0.1/32"], "max_shard_retries": 1, "progress_interval_s": 2.0,
    "ray": {"num_cpus": 2}, "mlflow": {"system_metrics": False},
}


# --------------------------------------------------------------------------------------------
# Test data: images, a loopback server, a filter-like input


def jpeg_bytes(seed: int, size=(48, 40)) -> bytes:
    img = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % size[0], 0), (255, 255, 255))  # distinct content per seed
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


@dataclasses.dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_type: str = "image/jpeg"
    delay_s: float = 0.0
    headers: tuple = ()
    drip_s: float = 0.0  # > 0: the body one byte at a time, this long apart (a slow-drip server)


class LoopbackServer:
    """ThreadingHTTPServer on a loopback address with a route table and per-path hit counts."""

    def __init__(self, host: str):
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                route = server.routes.get(self.path, Route(404, b"not found", "text/plain"))
                if route.delay_s:
                    time.sleep(route.delay_s)
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    for name, value in route.headers:
                        self.send_header(name, value)
                    self.end_headers()
                    if route.drip_s:
                        for byte in route.body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(route.drip_s)
                    else:
                        self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def servers():
    main, second = LoopbackServer("127.0.0.1"), LoopbackServer("127.0.0.2")
    yield main, second
    main.close()
    second.close()


def uid_for(url: str, caption: str) -> str:
    return hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=8).hexdigest()


def write_filter_output(root: str, urls: list[str], rows_per_file: int) -> str:
    """A finished `filter` version: part-*.parquet with the contract's columns + manifest.json."""
    os.makedirs(root, exist_ok=True)
    captions = [f"caption {i} for a test image" for i in range(len(urls))]
    table = pa.table({
        "uid": [uid_for(u, c) for u, c in zip(urls, captions)],
        "URL": urls, "TEXT": captions,
        "WIDTH": pa.array([48] * len(urls), pa.int64()), "HEIGHT": pa.array([40] * len(urls), pa.int64()),
        "aesthetic": [5.0 + i / 100 for i in range(len(urls))], "punsafe": [0.01] * len(urls),
        "pwatermark": [0.1] * len(urls), "similarity": [0.3] * len(urls),
        "hash": pa.array(list(range(len(urls))), pa.int64()),
    })
    for i, start in enumerate(range(0, len(urls), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), os.path.join(root, f"part-{i:05d}.parquet"),
                       row_group_size=3)
    manifest.write(root, phase="filter", cfg={"test": True}, input_uri=None, input_id=None,
                   counts={"rows": len(urls)})
    return root


def read_samples(version_dir: str) -> list[dict]:
    """Every sample of every tar: its key, image size and .json."""
    samples = []
    for tar_path in sorted(storage.list_files(version_dir, suffix=".tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".jpg"):
                    key = name[:-4]
                    meta = json.loads(tar.extractfile(members[key + ".json"]).read())
                    caption = tar.extractfile(members[key + ".txt"]).read().decode()
                    size = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).size
                    samples.append({"key": key, "meta": meta, "caption": caption, "size": size,
                                    "tar": os.path.basename(tar_path)})
    return samples


def write_config(path: str, **settings) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({**TEST_SETTINGS, **settings}, f)
    return path


# --------------------------------------------------------------------------------------------
# Fast unit tests (no Ray, no img2dataset)


def test_shards_are_deterministic_consecutive_slices_across_files():
    files = [download.InputFile("a", 5), download.InputFile("b", 0), download.InputFile("c", 6)]
    plans = download.plan_shards(files, 4)
    assert [p.name for p in plans] == ["00000", "00001", "00002"]
    assert [p.slices for p in plans] == [(("a", 0, 4),), (("a", 4, 5), ("c", 0, 3)), (("c", 3, 6),)]
    assert [p.num_rows for p in plans] == [4, 4, 3]
    assert download.plan_shards(files, 4) == plans
    assert download.shard_name_digits(123_456) == 6


@pytest.mark.parametrize("status, message, reason", [
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_503"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "<urlopen error blocked_address: refusing to connect to 127.0.0.2: loopback>",
     "blocked_address"),
    ("failed_to_download", "response_too_large: body exceeds 1024 bytes", "response_too_large"),
    ("failed_to_download", "<urlopen error unknown url type: file>", "invalid_url"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed_by_robots_tag"),
    ("failed_to_resize", "decompression_bomb: 20000x20000 pixels exceeds max_image_pixels=1", "decompression_bomb"),
    ("failed_to_resize", "truncated_image: JPEG data ends before the end of the image", "truncated_image"),
    ("failed_to_resize", "not_an_image: content is not one of the accepted image formats [...] (HTML)", "not_an_image"),
    ("failed_to_resize", "Image decoding error", "decode_error"),
    ("failed_to_resize", "image too small", "image_too_small"),
    ("failed_to_resize", "something new", "resize_error"),
    ("failed_to_download", "something new", "download_error"),
])
def test_failure_reasons(status, message, reason):
    assert download_task.failure_reason(status, message) == reason


def test_image_inspection_rejects_unsafe_content_before_decoding():
    good = jpeg_bytes(1)
    assert download_task.inspect_image(good, 10**6) is None
    assert download_task.inspect_image(png_bytes((20, 10)), 10**6) is None
    assert download_task.inspect_image(good[: len(good) // 2], 10**6).startswith("truncated_image")
    png = png_bytes((64, 64), "L")
    assert download_task.inspect_image(png[:-20], 10**6).startswith("truncated_image")
    assert download_task.inspect_image(b"<!DOCTYPE html><html>hi</html>", 10**6).startswith("not_an_image")
    assert "48x40" in download_task.inspect_image(good, 1000)  # bomb check reads only the header
    gif = io.BytesIO()
    Image.new("P", (30, 30)).save(gif, "GIF")
    assert download_task.inspect_image(gif.getvalue(), 10**6) is None


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"allowed_networks\[0\]: '127.0.0.1/40'"):
        config_lib.load(download.DownloadConfig, overrides=["allowed_networks=['127.0.0.1/40']"])
    with pytest.raises(ConfigError, match="resize_mode"):
        config_lib.load(download.DownloadConfig, overrides=["resize_mode=stretch"])
    with pytest.raises(ConfigError, match="metadata_columns"):
        config_lib.load(download.DownloadConfig, overrides=["metadata_columns=[status]"])
    with pytest.raises(ConfigError, match="input: required"):
        download.output_dir(download.DownloadConfig())


def test_bad_input_is_named(tmp_path):
    root = str(tmp_path / "filtered")
    os.makedirs(root)
    pq.write_table(pa.table({"uid": ["a"], "URL": ["http://127.0.0.1:1/x"]}), os.path.join(root, "part-00000.parquet"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        download.scan_input(root)
    manifest.write(root, phase="filter", cfg={}, input_uri=None, input_id=None, counts={})
    with pytest.raises(InputError, match=r"part-00000.parquet: required column 'TEXT' is missing"):
        download.scan_input(root)


def test_guarded_opener_enforces_on_the_connected_address(servers, monkeypatch):
    main, second = servers
    good = jpeg_bytes(99)
    url = main.add("/opener/good.jpg", Route(body=good))
    second_url = second.add("/opener/good.jpg", Route(body=good))
    policy = netguard.GuardPolicy(("127.0.0.1/32",), max_response_bytes=4096)
    opener = policy.opener()
    assert opener.open(url, timeout=5).read() == good

    hits_before = second.total_hits()
    with pytest.raises(urllib.error.URLError, match="blocked_address.*127.0.0.2 is loopback"):
        opener.open(second_url, timeout=5)
    with pytest.raises(urllib.error.URLError, match="blocked_address"):  # HTTPS: refused before TLS
        opener.open(f"https://127.0.0.2:{second.port}/opener/good.jpg", timeout=5)
    # Redirects are checked hop by hop.
    redirect = main.add("/opener/redirect", Route(302, b"", "text/plain", headers=(("Location", second_url),)))
    with pytest.raises(urllib.error.URLError, match="blocked_address"):
        opener.open(redirect, timeout=5)
    # DNS rebinding: the name is resolved once and the connection goes to the address that was
    # checked; a resolver whose answer changes between calls cannot redirect the connection.
    answers = iter(["127.0.0.1", "127.0.0.2"])
    calls = []
    real_getaddrinfo = socket.getaddrinfo

    def flipping_getaddrinfo(host, port, *args, **kwargs):
        if host == "rebind.test":
            calls.append(host)
            return real_getaddrinfo(next(answers), port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flipping_getaddrinfo)
    assert opener.open(f"http://rebind.test:{main.port}/opener/good.jpg", timeout=5).read() == good
    assert calls == ["rebind.test"]
    assert second.total_hits() == hits_before

    big = main.add("/opener/big.bin", Route(body=b"x" * 10_000))
    with pytest.raises(netguard.ResponseTooLargeError):
        opener.open(big, timeout=5).read()
    with pytest.raises(urllib.error.URLError, match="unknown url type: file"):
        opener.open("file:///etc/hostname", timeout=5)


# --------------------------------------------------------------------------------------------
# The phase end to end (embedded Ray, real img2dataset, real HTTP on loopback, MLflow)


@pytest.mark.e2e
def test_phase_counts_every_fault_exactly(tmp_path, servers, embedded_ray):
    main, second = servers
    good_urls = [main.add(f"/good/{i}.jpg", Route(body=jpeg_bytes(i))) for i in range(12)]
    decoy = second.add("/decoy.jpg", Route(body=jpeg_bytes(500)))  # the guard must keep us away from it
    real = jpeg_bytes(7)
    faults = {
        "http_404": [main.url("/missing/a.jpg"), main.url("/missing/b.jpg")],
        "http_500": [main.add("/error.jpg", Route(500, b"boom", "text/plain"))],
        # A slow response, and a slow drip: one byte every half read-timeout, which only the URL's deadline
        # (max_response_seconds below) ends.
        "timeout": [main.add("/slow.jpg", Route(body=real, delay_s=3 * TIMEOUT_S)),
                    main.add("/drip.jpg", Route(body=real, drip_s=TIMEOUT_S / 2))],
        "truncated_image": [main.add("/truncated.jpg", Route(body=real[: len(real) // 2]))],
        "not_an_image": [main.add("/page.jpg", Route(body=b"<!DOCTYPE html><html><body>no</body></html>",
                                                     content_type="text/html"))],
        "decompression_bomb": [main.add("/bomb.png", Route(body=png_bytes((20000, 20000), "1"),
                                                           content_type="image/png"))],
        "blocked_address": [main.add("/redirect.jpg", Route(302, b"", "text/plain", headers=(("Location", decoy),))),
                            decoy],
    }
    fault_urls = [u for group in faults.values() for u in group]
    urls = [u for pair in zip(good_urls, fault_urls + [None] * 2) for u in pair if u]  # every shard mixed
    input_dir = write_filter_output(str(tmp_path / "filtered" / "v1"), urls, rows_per_file=8)
    data_root = str(tmp_path / "data")
    argv = ["--config", write_config(str(tmp_path / "download.yaml"), shard_size=8, data_root=data_root,
                                     max_response_seconds=3 * TIMEOUT_S), "--input", input_dir]

    result = download.main(argv)
    report = result.details

    expected_failures = {reason: len(group) for reason, group in faults.items()}
    assert report["input_rows"] == len(urls) == 22
    assert report["succeeded"] == len(good_urls)
    assert report["failures"] == expected_failures
    assert report["input_rows"] == report["succeeded"] + sum(report["failures"].values())
    # The drip ended at the URL's deadline (every byte came within the read timeout).
    assert any("max_response_seconds=3 s" in m for m in report["failure_examples"]["timeout"])
    assert report["shards"] == {"total": 3, "completed": 3, "resumed": 0, "failed": 0, "failed_shards": {}}
    assert second.hits.get("/decoy.jpg", 0) == 0, "the guard let a request through to 127.0.0.2"
    assert main.hits["/redirect.jpg"] == 1 and main.hits["/missing/a.jpg"] == 1

    cfg = download.PHASE.load_config(argv)
    out = download.output_dir(cfg)
    assert report["output"] == out and manifest.has_manifest(out)
    assert result.output == out and not result.skipped and result.counts["samples"] == 12
    assert sorted(os.listdir(out)) == sorted(
        [f"{i:05d}{ext}" for i in range(3) for ext in (".tar", ".parquet", "_stats.json")]
        + ["config.yaml", "manifest.json", "report.json", "report"])
    assert storage.read_json(os.path.join(out, "report.json")) == report
    # The picture report: downloaded vs failed by reason, the failed URLs of each reason, thumbnails.
    pictures = storage.read_json(os.path.join(out, "report", "report.json"))
    assert pictures["kept"] == 12 and pictures["dropped_by_reason"] == expected_failures
    for reason, group in faults.items():
        shown = [r["url"] for r in pictures["samples"][reason]]
        assert shown and all(u in group for u in shown), reason
    assert sorted(os.listdir(os.path.join(out, "report"))) == ["reasons.png", "report.html", "report.json",
                                                               "thumbnails.png"]
    samples = read_samples(out)
    by_uid = {s["meta"]["uid"]: s for s in samples}
    inputs = pa.concat_tables(pq.read_table(f) for f in storage.list_files(input_dir, suffix=".parquet")).to_pylist()
    expected_uids = {row["uid"] for row in inputs if row["URL"] in good_urls}
    assert set(by_uid) == expected_uids and len(samples) == len(expected_uids)
    row = next(r for r in inputs if r["URL"] == good_urls[3])
    sample = by_uid[row["uid"]]
    assert sample["caption"] == row["TEXT"] == sample["meta"]["caption"]
    assert sample["meta"]["url"] == row["URL"]
    for column in ("aesthetic", "punsafe", "pwatermark", "similarity", "WIDTH", "HEIGHT", "hash"):
        assert sample["meta"][column] == row[column]
    assert all(s["size"] == (32, 32) for s in samples)  # center_crop to image_size
    assert len({s["key"] for s in samples}) == len(samples)  # keys unique across shards
    assert {s["key"][:5] for s in samples} == {"00000", "00001", "00002"}

    tracking_uri = tracking.tracking_uri_for(data_root)
    run = tracking.find_runs("download", tracking_uri=tracking_uri)[0]
    assert run.data.metrics["succeeded"] == 12 and run.data.metrics["failures.blocked_address"] == 2
    assert run.data.metrics["progress.shards_done"] == 3
    assert manifest.read(out)["mlflow_run_id"] == run.info.run_id
    import mlflow

    artifacts = {a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "report")}
    assert {"report/reasons.png", "report/report.html"} <= artifacts

    # A rerun of a completed version is a no-op.
    hits = main.total_hits()
    again = download.main(argv)
    assert again.skipped and again.details == report and again.manifest == result.manifest
    assert main.total_hits() == hits


def _kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the phase driver's process group (only what this test started); Ray then ends the
    dead driver's tasks and workers itself."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.mark.e2e
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, servers, embedded_ray):
    main, _ = servers
    urls = [main.add(f"/resume/{i}.jpg", Route(body=jpeg_bytes(1000 + i), delay_s=0.3)) for i in range(40)]
    input_dir = write_filter_output(str(tmp_path / "filtered" / "v1"), urls, rows_per_file=15)
    config = write_config(str(tmp_path / "download.yaml"), shard_size=4, threads_per_task=2,
                          data_root=str(tmp_path / "data"), mlflow={"enabled": False},
                          scratch_dir=str(tmp_path))  # a killed task's scratch dir is left behind
    interrupted_root = str(tmp_path / "interrupted")
    argv = ["--config", config, "--input", input_dir, "--output", interrupted_root]

    # The interrupted driver joins the module's Ray (token auth: the embedded cluster's default token).
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "RAY_AUTH_MODE": "token"}
    log_path = tmp_path / "interrupted.log"
    with open(log_path, "wb") as log_file:
        # One shard at a time: one cold worker to start, and a clear point to interrupt at.
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.download", *argv, "--set",
                                 f"ray.address={embedded_ray}", "--set", "max_tasks_in_flight=1"], cwd=REPO_ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        complete_at_kill = []
        while time.time() < deadline and proc.poll() is None:
            complete_at_kill = [p for d in storage.list_dirs(interrupted_root)
                                for p in storage.list_files(d, suffix="_stats.json")]
            if len(complete_at_kill) >= 2:
                break
            time.sleep(0.2)
    finally:
        _kill_process_group(proc)
    assert 2 <= len(complete_at_kill) < 10, f"not interrupted mid-run:\n{log_path.read_text()[-3000:]}"
    (version_dir,) = storage.list_dirs(interrupted_root)
    assert not manifest.has_manifest(version_dir)

    resumed = download.main(argv).details
    uninterrupted = download.main(["--config", config, "--input", input_dir, "--output", str(tmp_path / "clean")]).details

    assert resumed["shards"]["resumed"] >= 2 and resumed["shards"]["completed"] == 10
    assert resumed["version"] == uninterrupted["version"]
    for key in ("input_rows", "succeeded", "failures"):
        assert resumed[key] == uninterrupted[key]
    resumed_uids = [s["meta"]["uid"] for s in read_samples(version_dir)]
    clean_uids = [s["meta"]["uid"] for s in read_samples(uninterrupted["output"])]
    assert len(resumed_uids) == len(set(resumed_uids)) == 40  # no duplicates, no gaps
    assert set(resumed_uids) == set(clean_uids)
    assert not [n for n in os.listdir(version_dir) if n.startswith(".")]


@pytest.mark.e2e
@pytest.mark.slow_e2e  # the workflow test submits download as a Ray job too; this adds the albumentations check
def test_phase_as_ray_job(ray_cluster, tmp_path, servers):
    main, _ = servers
    urls = [main.add(f"/job/{i}.jpg", Route(body=jpeg_bytes(2000 + i))) for i in range(5)]
    urls.append(main.url("/job/missing.jpg"))
    input_dir = write_filter_output(str(tmp_path / "filtered" / "v1"), urls, rows_per_file=6)
    config = write_config(str(tmp_path / "download.yaml"), shard_size=3, ray={},
                          mlflow={"enabled": False})
    status, logs = ray_cluster.submit(["python", "-m", "pipelines.download", "--config", config,
                                       "--input", input_dir, "--output", str(tmp_path / "images")], timeout=300)
    assert status == "SUCCEEDED", logs
    # Shard tasks run this module's import-time set-up (not a by-value copy of __main__), so
    # albumentations never phones PyPI from a worker.
    assert "Albumentations is available" not in logs
    assert "shard 00001 done (2/2)" in logs or "shard 00000 done (2/2)" in logs
    (version_dir,) = storage.list_dirs(str(tmp_path / "images"))
    report = storage.read_json(os.path.join(version_dir, "report.json"))
    assert report["succeeded"] == 5 and report["failures"] == {"http_404": 1}
    assert manifest.has_manifest(version_dir)
