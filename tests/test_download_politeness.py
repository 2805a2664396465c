"""Download politeness, failed shards, and the cheap resume check (issue 19, the download side).

NETWORK RULE: every request in this file goes to 127.0.0.1 (loopback), to servers started here. DNS
caching is tested through the resolver and the guard's functions with a stand-in lookup: no name is
resolved over the network, and a cached non-loopback answer is refused without any connection.

Waits are asserted on what the server recorded (arrival order and timestamps, with generous lower
bounds) or on the computed wait (pure functions), never on the test's elapsed time.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines import config as config_lib  # noqa: E402
from pipelines import download, download_task, manifest, netguard, storage  # noqa: E402
from pipelines.config import ConfigError  # noqa: E402


def jpeg(seed: int, size=(40, 40), noise: bool = False) -> bytes:
    if noise:  # incompressible: big enough that a shard's tar has a middle its quick check never reads
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
    else:
        img = Image.new("RGB", size, (seed * 37 % 256, 90, 30))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


class CountingServer:
    """Loopback HTTP on two ports of 127.0.0.1 (two "hosts" as the per-host limit counts them:
    name:port), sharing one record: every request's arrival (monotonic time, Host, path, User-Agent,
    status), and the most requests each Host had in progress at once.

    /slow/<n>: a JPEG after `slow_s`. /noise/<n>: a large noise JPEG. Any path with a script
    (`script(path, [(status, headers), ...])`) answers those responses to its first hits, then a JPEG."""

    def __init__(self, slow_s: float = 0.25):
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.scripts: dict[str, list] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                host = self.headers.get("Host", "")
                with server.lock:
                    arrived = time.monotonic()
                    server.active[host] = server.active.get(host, 0) + 1
                    server.peak[host] = max(server.peak.get(host, 0), server.active[host])
                    script = server.scripts.get(self.path)
                    status, headers = script.pop(0) if script else (200, ())
                if self.path.startswith("/slow/"):
                    time.sleep(server.slow_s)
                seed = int(self.path.rsplit("/", 1)[-1])
                body = jpeg(seed, (300, 300), noise=True) if self.path.startswith("/noise/") else jpeg(seed)
                if status != 200:
                    body = b"slow down"
                # Counted out before the response is sent: the server's "in progress" interval lies inside
                # the client's hold of its connection slot, so the peak never over-counts.
                with server.lock:
                    server.active[host] -= 1
                    server.log.append({"t": arrived, "host": host, "path": self.path, "status": status,
                                       "user_agent": self.headers.get("User-Agent")})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in headers:
                        self.send_header(name, value() if callable(value) else value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpds = []
        for _ in range(2):
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            self.httpds.append(httpd)
        self.ports = [h.server_address[1] for h in self.httpds]

    def host(self, which: int = 0) -> str:
        return f"127.0.0.1:{self.ports[which]}"

    def url(self, path: str, which: int = 0) -> str:
        return f"http://{self.host(which)}{path}"

    def script(self, path: str, responses: list, which: int = 0) -> str:
        with self.lock:
            self.scripts[path] = list(responses)
        return self.url(path, which)

    def requests(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["path"] == path]

    def hits(self, path: str) -> int:
        return len(self.requests(path))

    def close(self):
        for httpd in self.httpds:
            httpd.shutdown()
            httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = CountingServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module", autouse=True)
def _img2dataset_imported():
    import img2dataset.downloader  # noqa: F401 - once up front, not inside a shard's deadline


BASE = {"image_size": 32, "min_image_size": 16, "timeout": 5.0, "retries": 0, "threads_per_task": 4,
        "allowed_networks": ["127.0.0.1/32"]}


def write_input(root: str, urls: list[str], rows_per_file: int | None = None, uids=None) -> str:
    os.makedirs(root, exist_ok=True)
    uids = uids or [hashlib.blake2b(f"{i}\x00{u}".encode(), digest_size=8).hexdigest() for i, u in enumerate(urls)]
    table = pa.table({"uid": uids, "URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]})
    step = rows_per_file or len(urls)
    for i, start in enumerate(range(0, len(urls), step)):
        pq.write_table(table.slice(start, step), os.path.join(root, f"part-{i:05d}.parquet"))
    manifest.write(root, phase="filter", cfg={"test": True}, input_uri=None, input_id=None,
                   counts={"rows": len(urls)})
    return root


def shard_setup(tmp_path, urls: list[str], **overrides):
    """(plan, settings) of one shard over `urls`, for download_task.download_shard in this process (no Ray)."""
    input_dir = write_input(str(tmp_path / "filtered"), urls)
    cfg = config_lib.from_dict(download.DownloadConfig, {**BASE, "input": input_dir,
                                                         "output": str(tmp_path / "images"), **overrides})
    files, schema = download.scan_input(input_dir)
    (plan,) = download.plan_shards(files, len(urls))
    out = str(tmp_path / "images" / "v")
    os.makedirs(out, exist_ok=True)
    settings = download_task.ShardSettings.from_config(cfg, out, download.selected_metadata_columns(schema, None), 5)
    return plan, settings


def run_shard(tmp_path, urls: list[str], **overrides) -> dict:
    plan, settings = shard_setup(tmp_path, urls, **overrides)
    return download_task.download_shard(plan, settings)


# --------------------------------------------------------------------------------------------
# Pure functions: Retry-After, the wait, the host key, the user agent, the config


def test_retry_after_in_seconds_and_http_date_forms():
    now = 1_700_000_000.0
    assert download_task.parse_retry_after("120", now) == 120.0
    assert download_task.parse_retry_after(" 3 ", now) == 3.0
    in_30_s = email.utils.formatdate(now + 30, usegmt=True)  # "Tue, 14 Nov 2023 22:13:50 GMT"
    assert download_task.parse_retry_after(in_30_s, now) == pytest.approx(30.0, abs=1.0)
    assert download_task.parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-5", "1.5", "\u00b2"):
        assert download_task.parse_retry_after(unreadable, now) is None


def test_throttle_wait_honours_retry_after_up_to_the_cap_else_backs_off():
    wait = download_task.throttle_wait
    assert wait(2.0, 0, backoff_s=1.0, max_wait_s=60.0) == 2.0
    assert wait(0.0, 5, backoff_s=1.0, max_wait_s=60.0) == 0.0
    assert wait(3600.0, 0, backoff_s=1.0, max_wait_s=60.0) is None  # asked for more than the cap: not retried
    assert [wait(None, a, backoff_s=0.5, max_wait_s=3.0) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_host_key_and_user_agent():
    assert download_task.host_key("http://CDN.Example.com/a.jpg") == "cdn.example.com:80"
    assert download_task.host_key("https://cdn.example.com/a.jpg") == "cdn.example.com:443"
    assert download_task.host_key("http://[::1]:8080/a") == "::1:8080"
    default = download.DownloadConfig().user_agent
    assert default.startswith("wurst-download/") and "Wuerstchen" in default
    assert download_task.user_agent_for("bot/1", "wurst") == "bot/1 (wurst)"
    assert download_task.user_agent_for("wurst-bot/1", "WURST") == "wurst-bot/1"  # already named
    assert download_task.user_agent_for("bot/1", None) == "bot/1"


def test_politeness_keys_are_validated_and_do_not_change_the_version(tmp_path):
    for override, key in (("max_connections_per_host=0", "max_connections_per_host"),
                          ("max_failed_shard_fraction=1.5", "max_failed_shard_fraction"),
                          ("max_retry_wait_s=0", "max_retry_wait_s"), ("dns_cache_seconds=-1", "dns_cache_seconds"),
                          ("throttle_retries=-1", "throttle_retries"), ("resume_check=never", "resume_check")):
        with pytest.raises(ConfigError, match=key):
            config_lib.load(download.DownloadConfig, overrides=[override])
    with pytest.raises(ConfigError, match="user_agent"):
        config_lib.from_dict(download.DownloadConfig, {"user_agent": "bot/1\r\nX-Injected: yes"})
    with pytest.raises(ConfigError, match="user_agent"):
        config_lib.from_dict(download.DownloadConfig, {"user_agent": "  "})

    input_dir = write_input(str(tmp_path / "filtered"), ["http://127.0.0.1:9/x.jpg"])
    cfg = config_lib.from_dict(download.DownloadConfig, {"input": input_dir})
    changed = config_lib.from_dict(download.DownloadConfig, {
        "input": input_dir, "user_agent": "other/2", "max_connections_per_host": 1, "throttle_retries": 0,
        "retry_backoff_s": 9.0, "max_retry_wait_s": 1.0, "dns_cache_seconds": 0, "max_failed_shard_fraction": 0.5,
        "resume_check": "full"})
    input_id = download.PHASE.input_identity(cfg)
    assert download.PHASE.version(changed, input_id) == download.PHASE.version(cfg, input_id)
    # ... and the version is the one computed before these keys existed.
    new_keys = {"user_agent", "max_connections_per_host", "throttle_retries", "retry_backoff_s", "max_retry_wait_s",
                "dns_cache_seconds", "max_failed_shard_fraction", "resume_check"}
    legacy = {k: v for k, v in config_lib.to_dict(cfg).items() if k not in download.LATE_KEYS and k not in new_keys}
    old_exclude = tuple(k for k in download.VERSION_EXCLUDE if k not in new_keys)
    assert download.PHASE.version(cfg, input_id) == manifest.version_id("download", legacy, input_id,
                                                                        exclude=old_exclude)


def test_failed_shard_fraction_check_names_the_shards_and_the_key():
    download.check_failed_shards({}, 10, 0.0, "r.json", 2)
    download.check_failed_shards({"00003": "boom"}, 10, 0.1, "r.json", 2)  # 10% is not more than 10%
    with pytest.raises(download.ShardsFailedError, match=r"2 of 10 shard\(s\).*00003, 00007.*max_failed_shard_fraction=0.1"):
        download.check_failed_shards({"00007": "x", "00003": "y"}, 10, 0.1, "r.json", 2)


# --------------------------------------------------------------------------------------------
# DNS: cached per shard task, every address still checked (no network: a stand-in lookup)


def _answer(*ips: str):
    return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 80)) for ip in ips]


class FakeLookup:
    def __init__(self, answers: dict):
        self.answers, self.calls = answers, []

    def __call__(self, host, port):
        self.calls.append(host)
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_cached_answers_are_checked_by_the_guard_every_time(monkeypatch):
    lookup = FakeLookup({"cdn.test": _answer("10.1.2.3"), "mixed.test": _answer("127.0.0.1", "169.254.169.254")})
    resolver = netguard.CachingResolver(300.0, lookup=lookup)
    policy = netguard.GuardPolicy(("127.0.0.1/32",))
    for _ in range(3):
        verdict = policy.check("http://cdn.test/a.jpg", resolver=resolver)
        assert verdict and "10.1.2.3 is private" in verdict.reason
        mixed = policy.check("http://mixed.test/a.jpg", resolver=resolver)
        assert mixed and "metadata" in mixed.reason  # one bad address blocks the name, cached or not
    assert lookup.calls == ["cdn.test", "mixed.test"] and resolver.hits == 4

    # The connection path: the cached private answer is refused before any socket exists.
    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was created for a blocked address")

    monkeypatch.setattr(netguard.socket, "socket", no_socket)
    for _ in range(2):
        with pytest.raises(netguard.BlockedAddressError, match="10.1.2.3 is private"):
            policy.create_connection(("cdn.test", 80), timeout=1, resolver=resolver)
    assert lookup.calls == ["cdn.test", "mixed.test"]


def test_the_resolver_cache_expires_keeps_answers_not_transient_failures():
    now = [0.0]
    lookup = FakeLookup({"a.test": _answer("127.0.0.1"),
                         "gone.test": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                         "flaky.test": socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")})
    resolver = netguard.CachingResolver(60.0, lookup=lookup, clock=lambda: now[0])
    resolver.getaddrinfo("a.test", 80)
    resolver.getaddrinfo("A.TEST.", 80)  # one name, however spelt
    now[0] = 61.0
    resolver.getaddrinfo("a.test", 80)
    assert lookup.calls == ["a.test", "a.test"]
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            resolver.getaddrinfo("gone.test", 80)  # an answer ("no such name"): cached
        with pytest.raises(socket.gaierror):
            resolver.getaddrinfo("flaky.test", 80)  # no answer: asked again
    assert lookup.calls.count("gone.test") == 1 and lookup.calls.count("flaky.test") == 2
    uncached = netguard.CachingResolver(0, lookup=lookup)
    uncached.getaddrinfo("a.test", 80)
    uncached.getaddrinfo("a.test", 80)
    assert lookup.calls.count("a.test") == 4


def test_the_guarded_opener_connects_through_the_cached_answer(server):
    # A stand-in lookup maps a made-up name to loopback: the connection goes to the checked address.
    lookup = FakeLookup({"images.test": socket.getaddrinfo("127.0.0.1", server.ports[0], 0, socket.SOCK_STREAM)})
    resolver = netguard.CachingResolver(300.0, lookup=lambda host, port: lookup(host, port))
    opener = netguard.GuardPolicy(("127.0.0.1/32",)).opener(resolver=resolver)
    for seed in (501, 502):
        with opener.open(f"http://images.test:{server.ports[0]}/img/{seed}", timeout=5) as response:
            assert response.read() == jpeg(seed)
    assert lookup.calls == ["images.test"] and resolver.hits == 1
    assert [r["host"] for r in server.requests("/img/502")] == [f"images.test:{server.ports[0]}"]


# --------------------------------------------------------------------------------------------
# One shard against the loopback server (real img2dataset in this process)


@pytest.mark.timeout(120)
def test_the_per_host_limit_is_never_exceeded_and_the_user_agent_arrives(tmp_path, server):
    server.peak.clear()
    a = [server.url(f"/slow/{i}", 0) for i in range(100, 112)]
    b = [server.url(f"/slow/{i}", 1) for i in range(200, 206)]
    urls = [u for pair in zip(a[:6], b) for u in pair] + a[6:]
    summary = run_shard(tmp_path / "limited", urls, threads_per_task=8, max_connections_per_host=2,
                        user_agent="wurst-test/9 (+mailto:data@example.org)", user_agent_token="wurstbot")
    assert summary["succeeded"] == 18 and summary["failures"] == {}
    assert server.peak[server.host(0)] == 2 and server.peak[server.host(1)] <= 2
    assert summary["politeness"]["peak_connections_per_host"] == 2 and summary["politeness"]["waited_for_host"] > 0
    agents = {r["user_agent"] for r in server.log if r["path"].startswith("/slow/1") or r["path"].startswith("/slow/2")}
    assert agents == {"wurst-test/9 (+mailto:data@example.org) (wurstbot)"}

    # The control: the same 8 threads with a limit of 8 do put more than 2 requests on one host at once.
    server.peak.clear()
    unlimited = [server.url(f"/slow/{i}", 0) for i in range(300, 312)]
    summary = run_shard(tmp_path / "unlimited", unlimited, threads_per_task=8, max_connections_per_host=8)
    assert summary["succeeded"] == 12
    assert server.peak[server.host(0)] > 2
    assert {r["user_agent"] for r in server.log if r["path"].startswith("/slow/3")} == {download.DownloadConfig().user_agent}


@pytest.mark.timeout(120)
def test_429_and_503_are_retried_after_their_retry_after(tmp_path, server):
    seconds = server.script("/t429/1", [(429, (("Retry-After", "1"),))])
    # The date is formatted when the response is sent: 2 s ahead, which HTTP-date's whole seconds make 1-2 s.
    dated = server.script("/t503/2", [(503, (("Retry-After", lambda: email.utils.formatdate(time.time() + 2,
                                                                                           usegmt=True)),))])
    too_long = server.script("/t429/3", [(429, (("Retry-After", "3600"),))])
    summary = run_shard(tmp_path, [seconds, dated, too_long], threads_per_task=3, max_connections_per_host=3,
                        max_retry_wait_s=5.0, throttle_retries=2)
    for path in ("/t429/1", "/t503/2"):
        first, second = server.requests(path)
        assert first["status"] in (429, 503) and second["status"] == 200
        assert second["t"] - first["t"] >= 0.9, f"{path} was retried before its Retry-After"
    # A Retry-After longer than max_retry_wait_s is not waited for: the URL fails with its status, once.
    assert server.hits("/t429/3") == 1
    assert summary["succeeded"] == 2 and summary["failures"] == {"http_429": 1}
    assert summary["politeness"]["throttled_retried"] == 2 and summary["politeness"]["throttled_not_retried"] == 1


@pytest.mark.timeout(120)
def test_a_retry_after_past_the_url_deadline_is_not_waited_for(tmp_path, server):
    # Within max_retry_wait_s, but the URL's own deadline (max_response_seconds) would pass first.
    url = server.script("/t429/4", [(429, (("Retry-After", "3"),))])
    summary = run_shard(tmp_path, [url, server.url("/img/650")], max_response_seconds=2.0, max_retry_wait_s=10.0)
    assert server.hits("/t429/4") == 1
    assert summary["succeeded"] == 1 and summary["failures"] == {"http_429": 1}
    assert summary["politeness"]["throttled_not_retried"] == 1


@pytest.mark.timeout(120)
def test_a_retry_after_pauses_the_whole_host(tmp_path, server):
    # One connection at a time to host 1: the 429's thread pauses the host before giving its slot back,
    # so whichever request comes next (another thread's URL or the retry) arrives after the pause.
    throttled = server.script("/pause/1", [(429, (("Retry-After", "1"),))], which=1)
    others = [server.url(f"/img/{i}", 1) for i in range(600, 604)]
    summary = run_shard(tmp_path, [others[0], throttled, *others[1:]], threads_per_task=4, max_connections_per_host=1)
    assert summary["succeeded"] == 5
    paths = {"/pause/1", *(f"/img/{i}" for i in range(600, 604))}
    with server.lock:
        log = sorted((r for r in server.log if r["host"] == server.host(1) and r["path"] in paths), key=lambda r: r["t"])
    assert len(log) == 6
    t429 = next(r["t"] for r in log if r["status"] == 429)
    after = [r for r in log if r["t"] > t429]
    assert after and all(r["t"] - t429 >= 0.9 for r in after)


@pytest.mark.timeout(120)
def test_a_tampered_finished_shard_is_detected_on_resume_and_redone(tmp_path, server):
    urls = [server.url(f"/noise/{i}") for i in range(700, 704)]
    plan, settings = shard_setup(tmp_path, urls, image_size=256, min_image_size=16)
    tar = os.path.join(settings.output_uri, f"{plan.name}.tar")

    first = download_task.download_shard(plan, settings)
    assert first["succeeded"] == 4 and not first["resumed"] and first["record"]["tar_members"] == 12
    original = open(tar, "rb").read()
    assert len(original) > 3 * download_task.EDGE_BYTES  # a middle the quick check never reads
    assert download_task.download_shard(plan, settings)["resumed"]
    assert all(server.hits(f"/noise/{i}") == 1 for i in range(700, 704))

    def fetched_again() -> bool:
        before = sum(server.hits(f"/noise/{i}") for i in range(700, 704))
        summary = download_task.download_shard(plan, settings)
        assert summary["succeeded"] == 4
        return not summary["resumed"] and sum(server.hits(f"/noise/{i}") for i in range(700, 704)) == before + 4

    # Truncated: the size check.
    with open(tar, "r+b") as f:
        f.truncate(len(original) - 1000)
    assert fetched_again()
    # Replaced by another valid tar of exactly the same size: the edges differ.
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as t:
        info = tarfile.TarInfo("99999.jpg")
        info.size = 100
        t.addfile(info, io.BytesIO(b"x" * 100))
    size = os.path.getsize(tar)
    with open(tar, "wb") as f:
        f.write(other.getvalue().ljust(size, b"\0"))
    assert fetched_again()
    # A header in the middle renamed (same size, same edges): the quick check reads no header there, so it
    # passes; `resume_check: full` reads the listing and redoes the shard.
    with tarfile.open(tar) as t:
        members = t.getmembers()
    middle = next(m for m in members if 2 * download_task.EDGE_BYTES < m.offset < size - 2 * download_task.EDGE_BYTES)
    data = bytearray(open(tar, "rb").read())
    data[middle.offset] = ord("9") if data[middle.offset] != ord("9") else ord("8")  # first byte of its name
    open(tar, "wb").write(bytes(data))
    assert download_task.download_shard(plan, settings)["resumed"]
    full = dataclasses.replace(settings, resume_check="full")
    before = server.hits("/noise/700")
    summary = download_task.download_shard(plan, full)
    assert not summary["resumed"] and server.hits("/noise/700") == before + 1
    # A shard parquet that no longer matches the tar's recorded keys (one success turned into a failure).
    parquet = os.path.join(settings.output_uri, f"{plan.name}.parquet")
    table = pq.read_table(parquet)
    status = table.column("status").to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status",
                                    pa.array(["failed_to_download", *status[1:]])), parquet)
    assert fetched_again()


# --------------------------------------------------------------------------------------------
# The phase: a shard that keeps failing (embedded Ray, real img2dataset)


def _corrupt_first_page(path: str) -> bytes:
    """Overwrite the first page header of a parquet file (its footer stays readable: the plan sees its
    rows, reading them fails). Returns the original bytes."""
    original = open(path, "rb").read()
    data = bytearray(original)
    data[4:40] = b"\xff" * 36
    open(path, "wb").write(bytes(data))
    return original


def _config(tmp_path, **settings) -> str:
    path = str(tmp_path / "download.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({**BASE, "shard_size": 2, "max_shard_retries": 1, "progress_interval_s": 2.0,
                        "data_root": str(tmp_path / "data"), "ray": {"num_cpus": 2},
                        "mlflow": {"enabled": False}, **settings}, f)
    return path


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_failing_shard_is_counted_the_fraction_fails_the_phase_and_a_rerun_retries_it(tmp_path, server,
                                                                                        embedded_ray):
    urls = [server.url(f"/img/{i}") for i in range(800, 806)]
    input_dir = write_input(str(tmp_path / "filtered"), urls, rows_per_file=2)  # 3 files = 3 shards
    broken = os.path.join(input_dir, "part-00001.parquet")
    original = _corrupt_first_page(broken)
    out_root = str(tmp_path / "images")
    argv = ["--config", _config(tmp_path), "--input", input_dir, "--output", out_root]

    # 1 of 3 shards is more than max_failed_shard_fraction=0.01 (the default): the phase fails, naming both.
    with pytest.raises(download.ShardsFailedError, match=r"1 of 3 shard\(s\) failed .*\(00001\).*max_failed_shard_fraction=0.01"):
        download.main(argv)
    (version_dir,) = storage.list_dirs(out_root)
    assert not manifest.has_manifest(version_dir)

    # Allowed up to half: the version completes, the failed shard's rows counted with their reason.
    result = download.main([*argv, "--set", "max_failed_shard_fraction=0.5"])
    report = result.details
    assert result.output == version_dir  # the fraction is not part of the version
    assert report["input_rows"] == 6 and report["succeeded"] == 4 and report["failures"] == {"shard_failed": 2}
    assert report["shards"]["resumed"] == 2 and list(report["shards"]["failed_shards"]) == ["00001"]
    assert report["failure_examples"]["shard_failed"][0].startswith("shard 00001: ")
    written = manifest.read(version_dir)
    assert written["funnel"] == {"input_rows": 6, "downloaded": 4, "failed": {"shard_failed": 2}}
    assert list(written["failed_shards"]) == ["00001"]
    assert not [n for n in os.listdir(version_dir) if n.startswith("00001")]
    assert not download.PHASE.is_complete(download.PHASE.load_config(argv), version_dir)

    # A rerun (the input readable again) retries that shard only, and completes the version in full.
    open(broken, "wb").write(original)
    hits_before = {i: server.hits(f"/img/{i}") for i in range(800, 806)}
    again = download.main(argv)
    assert not again.skipped and again.output == version_dir
    assert again.details["succeeded"] == 6 and again.details["failures"] == {}
    assert again.details["shards"] == {"total": 3, "completed": 3, "resumed": 2, "failed": 0, "failed_shards": {}}
    assert {i: server.hits(f"/img/{i}") - hits_before[i] for i in range(800, 806)} == {
        800: 0, 801: 0, 802: 1, 803: 1, 804: 0, 805: 0}
    assert manifest.read(version_dir)["failed_shards"] == {}
    assert download.main(argv).skipped  # now complete: a no-op


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_bad_input_in_a_shard_fails_the_phase_whatever_the_fraction(tmp_path, server, embedded_ray):
    urls = [server.url(f"/img/{i}") for i in range(900, 904)]
    input_dir = write_input(str(tmp_path / "filtered"), urls, uids=["u1", "u2", "u3", "u3"])
    argv = ["--config", _config(tmp_path, max_failed_shard_fraction=1.0), "--input", input_dir,
            "--output", str(tmp_path / "images")]
    with pytest.raises(download_task.DownloadInputError, match=r"^shard 00001 \(input .*duplicate"):
        download.main(argv)
