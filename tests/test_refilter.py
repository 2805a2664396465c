"""Re-filtering costs only the difference (issue 19): a download of a new filter version fetches only the rows
no earlier download of the same source holds, refers to the earlier samples (a selection) instead of copying
them, and every reader of the new version reads exactly its selection.

NETWORK RULE: every request in this file goes to 127.0.0.1 (loopback), to a server started here, which counts
each request by path.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pipelines import config as config_lib  # noqa: E402
from pipelines import download, image_shards, manifest, precompute_cpu, storage  # noqa: E402

N_ROWS = 40
GONE = {2, 5, 12, 21, 33}  # rows whose URL answers 404 (a permanent failure)


def jpeg(seed: int) -> bytes:
    img = Image.new("RGB", (40, 36), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % 40, 0), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class CountingServer:
    """Loopback HTTP: /img/<n>.jpg a JPEG, /gone/<n>.jpg a 404; every request counted by path."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                seed = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                status, body = (200, jpeg(seed)) if self.path.startswith("/img/") else (404, b"gone")
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg" if status == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.port = self.httpd.server_address[1]

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.hits)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = CountingServer()
    yield srv
    srv.close()


def rows(server: CountingServer) -> list[dict]:
    out = []
    for i in range(N_ROWS):
        url = f"http://127.0.0.1:{server.port}/{'gone' if i in GONE else 'img'}/{i}.jpg"
        caption = f"caption {i}"
        out.append({"uid": hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=16).hexdigest(),
                    "URL": url, "TEXT": caption, "aesthetic": 3.0 + (i * 7 % N_ROWS) / 10.0, "row": i})
    # A filter part's rows are in a uid-hash order: a tighter threshold keeps a subsequence of it.
    return sorted(out, key=lambda r: r["uid"])


def filter_version(root: str, name: str, all_rows: list[dict], threshold: float) -> tuple[str, list[dict]]:
    """A finished `filter` version: the rows with aesthetic >= threshold, in two part files."""
    kept = [r for r in all_rows if r["aesthetic"] >= threshold]
    path = os.path.join(root, name)
    os.makedirs(path)
    table = pa.Table.from_pylist(kept)
    half = len(kept) // 2
    pq.write_table(table.slice(0, half), os.path.join(path, "part-00000.parquet"))
    pq.write_table(table.slice(half), os.path.join(path, "part-00001.parquet"))
    manifest.write(path, phase="filter", cfg={"aesthetic_min": threshold}, input_uri=None, input_id=None,
                   counts={"rows": len(kept)})
    return path, kept


def run(input_dir: str, data_root: str, **settings):
    cfg = {"image_size": 32, "min_image_size": 16, "timeout": 5.0, "retries": 0, "threads_per_task": 4,
           "allowed_networks": ["127.0.0.1/32"], "shard_size": 7, "data_root": data_root, "input": input_dir,
           "ray": {"num_cpus": 2}, "mlflow": {"system_metrics": False}, **settings}
    return download.run(config_lib.from_dict(download.DownloadConfig, cfg))


def new_hits(before: dict, after: dict) -> dict[str, int]:
    return {p: n - before.get(p, 0) for p, n in after.items() if n != before.get(p, 0)}


def version_samples(version_dir: str) -> dict[str, dict]:
    """uid -> {key, jpg bytes, caption} of every sample a reader of the version sees (iter_shard_samples)."""
    out = {}
    for source in image_shards.list_shards(version_dir):
        for key, parts in image_shards.iter_shard_samples(source):
            meta = json.loads(parts["json"])
            assert meta["uid"] not in out
            out[meta["uid"]] = {"key": key, "jpg": parts["jpg"], "caption": parts["txt"].decode()}
    return out


def precompute_over(images: str, tmp_path, data_root: str, *extra: str):
    """The precompute phase (tiny text encoder and Stage A, CPU) over a download version."""
    import torch

    import stages
    from pipelines import precompute
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    checkpoints = tmp_path / "checkpoints"
    if not checkpoints.exists():  # written once: the encoders' hashes are part of what a reuse must match
        stages.save(TextEncoder(TextEncoderConfig.tiny()), checkpoints / "text")
        stages.save(StageA(StageAConfig.tiny()), checkpoints / "stage_a")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load(precompute.PrecomputeConfig, os.path.join(repo, "configs", "precompute-tiny.yaml"), [
        f"input={images}", f"encoders.text={checkpoints / 'text'}", f"encoders.stage_a={checkpoints / 'stage_a'}",
        "outputs=[text, stage_a]", "validation_fraction=0.3", f"data_root={data_root}", "mlflow.system_metrics=false",
        *extra])
    return precompute.run(cfg)


def latent_rows(result) -> pa.Table:
    """Every row of a precompute version (training and validation files), with its split."""
    tables = []
    for split, entries in (("train", result.manifest["shards"]), ("validation", result.manifest["validation"]["shards"])):
        for e in entries:
            table = pq.read_table(os.path.join(result.output, e["file"])).replace_schema_metadata(None)
            tables.append(table.append_column("split", pa.array([split] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def selection_rows(version_dir: str) -> list[dict]:
    return [r for s in image_shards.list_shards(version_dir) if image_shards.is_selection(s)
            for r in image_shards.read_selection(s, successes_only=False)]


@pytest.mark.e2e
def test_refilter_fetches_only_the_difference(tmp_path, server, embedded_ray):
    import img2dataset.downloader  # noqa: F401 - imported once up front

    all_rows = rows(server)
    data_root = str(tmp_path / "data")
    filtered = str(tmp_path / "filtered")
    base_in, base = filter_version(filtered, "base", all_rows, 4.5)
    tight_in, tight = filter_version(filtered, "tight", all_rows, 5.5)
    loose_in, loose = filter_version(filtered, "loose", all_rows, 3.5)
    mid_in, mid = filter_version(filtered, "mid", all_rows, 4.0)
    assert {r["uid"] for r in tight} < {r["uid"] for r in base} < {r["uid"] for r in loose}
    assert any(r["row"] in GONE for r in tight) and any(r["row"] in GONE for r in loose if r not in base)

    def path(r):
        return f"/{'gone' if r['row'] in GONE else 'img'}/{r['row']}.jpg"

    # First run: every row fetched once; a plain download (no selection).
    first = run(base_in, data_root)
    hits = server.snapshot()
    assert hits == {path(r): 1 for r in base}
    assert first.details["reuse"]["fetched_rows"] == len(base) and first.details["reuse"]["reused"] == 0
    assert "layout" not in first.manifest and first.manifest["reuse_key"]
    base_samples = version_samples(first.output)
    assert len(base_samples) == sum(r["row"] not in GONE for r in base)

    # Tighter threshold: no request at all; exactly the tight rows, the 404s reused as failures.
    before = server.snapshot()
    second = run(tight_in, data_root)
    assert new_hits(before, server.snapshot()) == {}
    report, m = second.details, second.manifest
    good = {r["uid"] for r in tight if r["row"] not in GONE}
    gone = sum(r["row"] in GONE for r in tight)
    assert report["input_rows"] == len(tight) and report["succeeded"] == len(good)
    assert report["failures"] == {"http_404": gone}
    assert report["reuse"] == {"reused_samples": len(good), "reused_failures": {"http_404": gone},
                               "fetched_rows": 0, "fetched_samples": 0, "fetched_failures": {},
                               "reused": len(tight)}
    assert m["layout"] == "selection" and m["reuse_pool"] == [first.version]
    assert m["counts"]["reused"] == len(tight) and m["counts"]["fetched_rows"] == 0
    assert m["funnel_by_origin"] == {"input_rows": len(tight), "downloaded_new": 0, "reused_samples": len(good),
                                     "fetched_failures": {}, "reused_failures": {"http_404": gone},
                                     "shard_failed": 0}
    # No bytes copied: the new version holds no tar, only selections and side files.
    assert not storage.list_files(second.output, suffix=".tar")
    samples = version_samples(second.output)
    assert set(samples) == good
    for uid, sample in samples.items():
        assert sample["jpg"] == base_samples[uid]["jpg"] and sample["caption"] == base_samples[uid]["caption"]
    assert len({s["key"] for s in samples.values()}) == len(samples)  # the version's keys are its own, unique
    sel = selection_rows(second.output)
    assert [r["uid"] for r in sel] == [r["uid"] for r in tight]  # every input row, in input order
    assert {r["origin"] for r in sel} == {"reused"}
    assert image_shards.count_images(second.output) == len(good)

    # Looser threshold: requests for exactly the new rows (once each); the base's 404s are not asked again.
    before = server.snapshot()
    third = run(loose_in, data_root)
    base_uids = {r["uid"] for r in base}
    new_rows = [r for r in loose if r["uid"] not in base_uids]
    assert new_hits(before, server.snapshot()) == {path(r): 1 for r in new_rows}
    reuse = third.details["reuse"]
    assert reuse["fetched_rows"] == len(new_rows) and reuse["reused"] == len(base)
    assert reuse["fetched_failures"] == ({"http_404": sum(r["row"] in GONE for r in new_rows)}
                                         if any(r["row"] in GONE for r in new_rows) else {})
    loose_good = {r["uid"] for r in loose if r["row"] not in GONE}
    loose_samples = version_samples(third.output)
    assert set(loose_samples) == loose_good
    for uid, sample in loose_samples.items():  # reused: the base's bytes; fetched: resized as configured
        if uid in base_samples:
            assert sample["jpg"] == base_samples[uid]["jpg"]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
    origins = {r["uid"]: r["origin"] for r in selection_rows(third.output)}
    assert {u for u, o in origins.items() if o == "fetched"} == {r["uid"] for r in new_rows}

    # refetch_failures: the pool's 404s are asked again (once), everything else still reused.
    before = server.snapshot()
    fourth = run(mid_in, data_root, refetch_failures=True)
    asked = new_hits(before, server.snapshot())
    assert asked == {path(r): 1 for r in mid if r["row"] in GONE}
    assert fourth.details["reuse"]["reused_failures"] == {}
    assert set(version_samples(fourth.output)) == {r["uid"] for r in mid if r["row"] not in GONE}

    # A rerun of a finished selection version is a no-op; the same version resumed after losing a shard's
    # stats (and its manifest) redoes that shard only, still without a request, to the same selection.
    before = server.snapshot()
    assert run(tight_in, data_root).skipped
    lost = image_shards.shard_files(second.output, "00001")
    kept_selection = pq.read_table(lost["selection"])
    os.remove(lost["stats"])
    os.remove(os.path.join(second.output, "manifest.json"))
    resumed = run(tight_in, data_root)
    assert not resumed.skipped and resumed.details["shards"]["resumed"] == resumed.details["shards"]["total"] - 1
    assert pq.read_table(lost["selection"]).equals(kept_selection)
    assert resumed.details["reuse"] == report["reuse"] and resumed.details["failures"] == report["failures"]
    assert new_hits(before, server.snapshot()) == {}

    # Precompute's decode tasks over the tight version read exactly its selection.
    seen = set()
    for source in image_shards.list_shards(second.output):
        batch = {"shard": np.array([image_shards.source_name(source)]), "tar": np.array([source])}
        for chunk in precompute_cpu.decode_shard(batch, chunk_size=4, size=16, max_image_pixels=10**8):
            meta = json.loads(chunk["meta"][0])
            assert not meta["skipped"]
            seen.update(meta["uids"])
    assert seen == good

    # The precompute phase over the tight version: its latents are exactly the selected samples.
    latents = precompute_over(second.output, tmp_path, data_root)
    assert latents.manifest["counts"]["input_samples"] == len(good) == latents.manifest["counts"]["written"]
    written = latent_rows(latents)
    assert sorted(written.column("uid").to_pylist()) == sorted(good)
    assert all(c == samples[u]["caption"] for u, c in zip(written.column("uid").to_pylist(),
                                                         written.column("caption").to_pylist()))

    assert latents.manifest["counts"]["reused"] == 0 and latents.manifest["reuse_pool"] == []

    # The loose version's latents: the tight version's samples copied (same split, the new version's keys), only
    # the new samples encoded.
    loose_latents = precompute_over(third.output, tmp_path, data_root)
    counts = loose_latents.manifest["counts"]
    assert loose_latents.manifest["reuse_pool"] == [latents.version]
    assert counts["reused"] == len(good) and counts["encoded"] == len(loose_good) - len(good)
    assert counts["written"] == len(loose_good) and counts["skipped"] == 0
    loose_rows, tight_rows = latent_rows(loose_latents), latent_rows(latents)
    assert sorted(loose_rows.column("uid").to_pylist()) == sorted(loose_good)
    by_uid = {r["uid"]: r for r in tight_rows.to_pylist()}
    loose_keys = {r["uid"]: r["key"] for r in selection_rows(third.output) if r["status"] == "success"}
    for row in loose_rows.to_pylist():
        assert row["key"] == loose_keys[row["uid"]]
        if row["uid"] in by_uid:  # copied byte for byte, in the split it had
            assert {k: v for k, v in row.items() if k != "key"} == \
                {k: v for k, v in by_uid[row["uid"]].items() if k != "key"}
    # The split of every row (copied or encoded) is the hash rule's, as in a run that encodes everything.
    from pipelines import latent_shards

    held_out = latent_shards.is_validation(loose_rows.column("uid").to_pylist(), 0.3)
    assert [s == "validation" for s in loose_rows.column("split").to_pylist()] == held_out.tolist()

    # Stage A's image-shard reader over the tight version: one epoch is exactly its samples.
    reader = image_shards.ImageShardReader(second.output, seed=3, batch_size=1, image_size=16, crop_size=16,
                                           shuffle_window=8)
    assert reader.num_samples == len(good)
    key_to_uid = {r["key"]: r["uid"] for r in sel if r["status"] == "success"}
    loaded = [reader.load(*p) for p in reader.positions(0, reader.num_samples)]
    assert sorted(key_to_uid[key] for _, key in loaded) == sorted(good)
    assert all(image.shape == (3, 16, 16) for image, _ in loaded)


class CountingFile:
    """A storage input file that counts the bytes read through it."""

    def __init__(self, inner, counter: list):
        self.inner, self.counter = inner, counter

    def read_at(self, n, offset):
        data = self.inner.read_at(n, offset)
        self.counter.append(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()

    def close(self):
        self.inner.close()


def test_a_small_selection_reads_only_its_samples(tmp_path, monkeypatch):
    """A selection of 2 of 12 large samples: readers range-read those two (plus their neighbours' gap at
    most), not the tar; the Stage A reader reads only the selected image members."""
    import tarfile

    from pipelines import download_task

    root = tmp_path / "images"
    (root / "old").mkdir(parents=True)
    (root / "new").mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(root / "old" / "00000.tar", "w") as tar:
        for i in range(12):
            img = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"c{i}".encode()),
                              ("json", json.dumps({"uid": f"u{i}", "caption": f"c{i}"}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tar_bytes = os.path.getsize(root / "old" / "00000.tar")
    index = image_shards.tar_member_index(str(root / "old" / "00000.tar"))
    picked = [3, 9]
    selection = pa.Table.from_pylist(
        [{"uid": f"u{i}", "key": download_task.version_key(0, j, 10, 5), "status": "success", "reason": None,
          "origin": "reused", "tar": "old/00000.tar",
          "members": json.dumps({e: list(v) for e, v in index[f"{i:09d}"].items()})} for j, i in enumerate(picked)]
        + [{"uid": "gone", "key": download_task.version_key(0, 2, 10, 5), "status": "failed", "reason": "http_404",
            "origin": "reused", "tar": None, "members": None}], schema=image_shards.selection_schema())
    pq.write_table(selection, root / "new" / f"00000{image_shards.SELECTION_SUFFIX}")
    assert image_shards.list_shards(str(root / "new")) == [str(root / "new" / f"00000{image_shards.SELECTION_SUFFIX}")]

    reads: list[int] = []
    real_open = storage.open_input
    monkeypatch.setattr(image_shards.storage, "open_input",
                        lambda uri: CountingFile(real_open(uri), reads) if uri.endswith(".tar") else real_open(uri))
    samples = list(image_shards.iter_shard_samples(image_shards.list_shards(str(root / "new"))[0]))
    assert [json.loads(p["json"])["uid"] for _, p in samples] == ["u3", "u9"]
    assert [k for k, _ in samples] == ["000000", "000001"]  # the new version's keys (img2dataset's rule)
    selected = sum(max(o + n for o, n in index[f"{i:09d}"].values()) - min(o for o, _ in index[f"{i:09d}"].values())
                   for i in picked)
    assert sum(reads) == selected and selected < tar_bytes / 4

    reads.clear()
    reader = image_shards.ImageShardReader(str(root / "new"), batch_size=1, image_size=32, crop_size=32)
    assert reader.num_samples == 2
    keys = sorted(reader.load(*p)[1] for p in reader.positions(0, 2))
    assert keys == ["000000", "000001"]
    assert sum(reads) == sum(index[f"{i:09d}"]["jpg"][1] for i in picked)
