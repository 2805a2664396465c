"""Download faults: a slow-drip server, the shard deadline, captions that are not UTF-8, the metadata address.

NETWORK RULE: every request goes to 127.0.0.1 (loopback). The metadata address is checked through the
guard's decision function only, never by connecting.

Deadlines are asserted through what is counted (the failure reason and its message, which deadline fired,
how often the server was hit), never through elapsed time.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines import config as config_lib  # noqa: E402
from pipelines import download, download_task, manifest, netguard  # noqa: E402

DRIP_INTERVAL_S = 2.0  # one byte every 2 s: each read returns well within the per-read timeout
PER_READ_TIMEOUT_S = 5.0


# A real EPS file (PIL's EpsImagePlugin identifies it; loading it would run Ghostscript where installed).
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
       b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (seed * 40 % 256, 90, 30)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class FaultServer:
    """Loopback HTTP: /good/<n> serves a JPEG, /drip/<n> sends headers then one body byte every 2 s."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                eps = self.path.startswith("/eps/")
                body = EPS if eps else jpeg(int(self.path.rsplit("/", 1)[-1]))
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/postscript" if eps else "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.path.startswith("/drip/"):
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            if server.stop.wait(DRIP_INTERVAL_S):
                                return
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the deadline is for

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = FaultServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module", autouse=True)
def _img2dataset_imported():
    # Imported once up front, so that a shard's deadline measures downloads, not a cold import.
    import img2dataset.downloader  # noqa: F401


def write_input(root: str, urls: list[str], captions=None) -> str:
    os.makedirs(root, exist_ok=True)
    captions = captions or [f"caption {i}" for i in range(len(urls))]
    uids = [hashlib.blake2b(f"{i}\x00{u}".encode(), digest_size=8).hexdigest() for i, u in enumerate(urls)]
    pq.write_table(pa.table({"uid": uids, "URL": urls, "TEXT": captions}), os.path.join(root, "part-00000.parquet"))
    manifest.write(root, phase="filter", cfg={"test": True}, input_uri=None, input_id=None,
                   counts={"rows": len(urls)})
    return root


def run_shard(tmp_path, urls: list[str], input_dir=None, **overrides) -> dict:
    """One shard through the real img2dataset downloader and our guard, in this process (no Ray)."""
    input_dir = input_dir or write_input(str(tmp_path / "filtered"), urls)
    settings = {"image_size": 32, "min_image_size": 16, "timeout": PER_READ_TIMEOUT_S, "retries": 0,
                "threads_per_task": 4, "allowed_networks": ["127.0.0.1/32"], "input": input_dir,
                "output": str(tmp_path / "images"), **overrides}
    cfg = config_lib.from_dict(download.DownloadConfig, settings)
    files, schema = download.scan_input(input_dir)
    plans = download.plan_shards(files, len(urls))
    out = str(tmp_path / "images" / "v")
    os.makedirs(out)
    columns = download.selected_metadata_columns(schema, None)
    shard_settings = download_task.ShardSettings.from_config(cfg, out, columns, 5)
    return download_task.download_shard(plans[0], shard_settings)


@pytest.mark.timeout(120)
def test_a_dripping_server_costs_at_most_the_url_deadline_retries_included(tmp_path, server):
    urls = [server.url("/good/1"), server.url("/drip/2"), server.url("/good/3"), server.url("/drip/4")]
    summary = run_shard(tmp_path, urls, max_response_seconds=3.0, retries=2)
    assert summary["succeeded"] == 2
    assert summary["failures"] == {"timeout": 2}
    # The URL's own deadline ended it (not a per-read timeout: a byte arrives every 2 s < 5 s) ...
    assert all("max_response_seconds=3 s" in m for m in summary["failure_examples"]["timeout"])
    # ... and the retries img2dataset makes found it already spent: each dripping URL was fetched once.
    assert server.hits["/drip/2"] == 1 and server.hits["/drip/4"] == 1
    assert server.hits["/good/1"] == 1


@pytest.mark.timeout(120)
def test_the_shard_deadline_counts_the_late_urls_as_timeout(tmp_path, server):
    # One thread, in input order: two good images, then drips whose 3 s each exceed the shard's 5 s.
    paths = ["/good/10", "/good/11", "/drip/12", "/drip/13", "/drip/14", "/good/15", "/good/16"]
    summary = run_shard(tmp_path, [server.url(p) for p in paths], threads_per_task=1,
                        max_response_seconds=3.0, max_shard_seconds=5.0)
    assert summary["succeeded"] == 2
    assert summary["failures"] == {"timeout": 5}  # the shard completed, every late URL counted
    assert any("max_shard_seconds" in m for m in summary["failure_examples"]["timeout"])
    # URLs that came after the shard's deadline were never requested.
    assert "/drip/14" not in server.hits and "/good/15" not in server.hits and "/good/16" not in server.hits


def test_reads_are_bounded_by_the_deadline_not_by_the_body_size(server):
    # The guarded opener on its own: one 64 KiB read of a dripping body ends at the deadline.
    opener = netguard.GuardPolicy(("127.0.0.1/32",), max_response_seconds=2.5).opener()
    with pytest.raises(netguard.DownloadDeadlineError, match="max_response_seconds=2.5 s"):
        with opener.open(server.url("/drip/20"), timeout=PER_READ_TIMEOUT_S) as response:
            response.read()
    # A shard deadline already past: no connection is made at all.
    late = netguard.GuardPolicy(("127.0.0.1/32",)).opener(shard_deadline=time.monotonic() - 1)
    with pytest.raises(OSError, match="max_shard_seconds"):
        late.open(server.url("/good/21"), timeout=PER_READ_TIMEOUT_S)
    assert "/good/21" not in server.hits


def test_the_metadata_address_needs_its_own_key_even_inside_allowed_networks():
    everything = ("0.0.0.0/0", "::/0")
    for address in ("169.254.169.254", "http://169.254.169.254/latest/meta-data/", "fd00:ec2::254",
                    "::ffff:169.254.169.254"):
        verdict = netguard.is_blocked(address, everything)
        assert verdict and "allow_metadata_address" in verdict.reason
        assert not netguard.is_blocked(address, everything, allow_metadata_address=True)
        # The key alone does not open it: it must be inside allowed_networks as well.
        assert netguard.is_blocked(address, (), allow_metadata_address=True)
    assert not netguard.is_blocked("169.254.1.1", everything)  # other link-local addresses: allowed_networks decides
    policy = netguard.GuardPolicy(everything)
    assert "stay blocked" in policy.metadata_warnings()[0]
    opened = netguard.GuardPolicy(everything, allow_metadata_address=True)
    assert "credentials" in opened.metadata_warnings()[0]
    assert netguard.GuardPolicy(("127.0.0.1/32",)).metadata_warnings() == []
    # The key travels to the workers with the policy.
    import pickle

    assert pickle.loads(pickle.dumps(opened)).allow_metadata_address is True


def test_new_download_keys_at_their_defaults_keep_existing_versions(tmp_path):
    input_dir = write_input(str(tmp_path / "filtered"), ["http://127.0.0.1:9/x.jpg"])
    cfg = config_lib.from_dict(download.DownloadConfig, {"input": input_dir})
    legacy = {k: v for k, v in config_lib.to_dict(cfg).items() if k not in download.LATE_KEYS}
    input_id = download.PHASE.input_identity(cfg)
    assert download.PHASE.version(cfg, input_id) == manifest.version_id(
        "download", legacy, input_id, exclude=download.VERSION_EXCLUDE)
    changed = config_lib.from_dict(download.DownloadConfig, {"input": input_dir, "allow_metadata_address": True})
    assert download.PHASE.version(changed, input_id) != download.PHASE.version(cfg, input_id)


@pytest.mark.timeout(120)
def test_a_caption_that_is_not_utf8_is_repaired_and_counted_not_failing_its_shard(tmp_path, server):
    urls = [server.url("/good/30"), server.url("/good/31"), server.url("/good/32")]
    input_dir = write_input(str(tmp_path / "filtered"), urls)
    part = os.path.join(input_dir, "part-00000.parquet")
    table = pq.read_table(part)
    # Parquet does not validate UTF-8: a string column can hold any bytes (a view skips Arrow's check too).
    raw = pa.array([b"fine", b"caf\xe9 au lait \xff", b"also fine"], pa.binary()).view(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("TEXT"), "TEXT", raw), part)
    summary = run_shard(tmp_path, urls, input_dir=input_dir)
    assert summary["succeeded"] == 3 and summary["failures"] == {}
    assert summary["repaired"] == {"invalid_utf8.TEXT": 1}
    out = str(tmp_path / "images" / "v")
    with tarfile.open(os.path.join(out, "00000.tar")) as tar:
        captions = sorted(tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers()
                          if m.name.endswith(".txt"))
    assert captions == ["also fine", "caf\ufffd au lait \ufffd", "fine"]
    report = download.build_report(download.plan_shards(download.scan_input(input_dir)[0], 3),
                                   {"00000": summary}, {}, version="v", input_uri=input_dir, output_uri=out,
                                   duration_s=1.0)
    assert report["repaired"] == {"invalid_utf8.TEXT": 1} and report["succeeded"] == 3


def test_an_eps_payload_is_not_an_image_and_never_decoded(tmp_path, server):
    from PIL import Image

    with Image.open(io.BytesIO(EPS)) as unrestricted:  # the payload is an EPS file PIL would open ...
        assert unrestricted.format == "EPS"
    # ... the pre-decode inspection does not: it identifies only the accepted web formats.
    assert download_task.inspect_image(EPS, 10**6).startswith("not_an_image: content is not one of the accepted")
    summary = run_shard(tmp_path, [server.url("/good/40"), server.url("/eps/41")])
    assert summary["succeeded"] == 1 and summary["failures"] == {"not_an_image": 1}
    # The shard readers refuse it too.
    from pipelines import image_shards

    with pytest.raises(image_shards.ImageShardError, match="cannot decode image"):
        image_shards.decode_and_crop(EPS, 32, 16, __import__("numpy").random.default_rng(0), "test.eps")


def test_failure_examples_in_the_report_carry_no_url_credentials():
    results = pa.table({"uid": ["a", "b"], "status": ["failed_to_download", "success"],
                        "error_message": ["HTTP Error 403: Forbidden (https://b.s3.amazonaws.com/x.jpg"
                                          "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=SIG123)", None]})
    succeeded, failures, examples = download_task.summarize_results(results, pa.array(["a", "b"]))
    assert succeeded == 1 and failures == {"http_403": 1}
    assert "SIG123" not in examples["http_403"][0] and "AKIAEXAMPLE" not in examples["http_403"][0]
    assert "b.s3.amazonaws.com/x.jpg" in examples["http_403"][0]


def test_precompute_never_opens_an_eps_from_a_shard():
    # An image shard is untrusted too (written elsewhere, or edited): precompute's decoder takes the shard formats.
    from PIL import UnidentifiedImageError

    from pipelines import precompute_cpu

    with pytest.raises(UnidentifiedImageError):
        precompute_cpu.decode_image(EPS, 32)
    record, pixels = precompute_cpu._read_sample("k", {"json": b'{"uid": "u", "caption": "c"}', "jpg": EPS}, 32, 10**7)
    assert pixels is None and record["reason"] == "decode_error"
