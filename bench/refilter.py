"""Re-filtering: what a download of a new filter version costs with reuse, against the first run and against
the same download without reuse (`reuse: false`, the behaviour before issue 19), in one process.

    python bench/refilter.py [--rows 240] [--gone 0.1] [--shard-size 40] [--precompute]

LAION-like rows (a uid, a URL, a caption, an aesthetic score spread over 3..7; a share `--gone` of the URLs
answer 404) are filtered at three thresholds: the first run (aesthetic >= 4.5), a tighter (>= 5.5) and a
looser (>= 4.0) one. Each filter version is downloaded once under an images root holding the first run's
version (reuse on), and once under a fresh root of its own (reuse off). A loopback server (127.0.0.1 only)
counts requests and the bytes of the bodies it sent; seconds are the phase's wall time (Ray already up).
--precompute: each download version is then precomputed (tiny text encoder and Stage A on CPU: the encoders
are cheap here, so the seconds understate what reuse saves on real encoders) into a latents root holding the
earlier versions' latents (reuse on) and into one of its own (reuse off); samples encoded and seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


class Server:
    """/img/<n>.jpg: a distinct ~20 KB JPEG; /gone/<n>.jpg: 404. Counts requests and body bytes."""

    def __init__(self):
        from PIL import Image

        rng = np.random.default_rng(0)
        self.bodies = []
        for _ in range(16):
            base = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
            pixels = np.clip(base + rng.normal(0, 12, (240, 320, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            self.bodies.append(buf.getvalue())
        self.lock = threading.Lock()
        self.requests = self.bytes = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                n = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                status, body = (200, server.bodies[n % 16]) if self.path.startswith("/img/") else (404, b"gone")
                with server.lock:
                    server.requests += 1
                    server.bytes += len(body)
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

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.requests, self.bytes


def laion_rows(n: int, gone: float, port: int) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        dead = rng.random() < gone
        url = f"http://127.0.0.1:{port}/{'gone' if dead else 'img'}/{i}.jpg"
        caption = f"a photo number {i}"
        out.append({"uid": hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=16).hexdigest(),
                    "URL": url, "TEXT": caption, "aesthetic": float(rng.uniform(3.0, 7.0)),
                    "punsafe": float(rng.uniform(0, 0.1))})
    return sorted(out, key=lambda r: r["uid"])


def filter_version(root: str, rows: list[dict], threshold: float) -> tuple[str, int]:
    from pipelines import manifest

    kept = [r for r in rows if r["aesthetic"] >= threshold]
    path = os.path.join(root, f"aesthetic-{threshold}")
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(kept), os.path.join(path, "part-00000.parquet"))
    manifest.write(path, phase="filter", cfg={"aesthetic_min": threshold}, input_uri=None, input_id=None,
                   counts={"rows": len(kept)})
    return path, len(kept)


def download(server: Server, input_dir: str, images: str, shard_size: int, reuse: bool) -> dict:
    from pipelines import config as config_lib
    from pipelines import download as download_phase

    cfg = config_lib.from_dict(download_phase.DownloadConfig, {
        "input": input_dir, "output": images, "data_root": os.path.dirname(images), "image_size": 64,
        "min_image_size": 16, "timeout": 5.0, "retries": 0, "threads_per_task": 8, "shard_size": shard_size,
        "allowed_networks": ["127.0.0.1/32"], "reuse": reuse, "progress_interval_s": 5.0,
        "ray": {"num_cpus": 2}, "mlflow": {"system_metrics": False}})
    requests, sent = server.counts()
    started = time.perf_counter()
    result = download_phase.run(cfg)
    seconds = time.perf_counter() - started
    after_requests, after_bytes = server.counts()
    return {"requests": after_requests - requests, "bytes": after_bytes - sent, "seconds": seconds,
            "rows": result.counts["input_rows"], "samples": result.counts["samples"],
            "reused": result.details["reuse"]["reused"], "fetched": result.details["reuse"]["fetched_rows"],
            "output": result.output}


def precompute(images: str, latents: str, checkpoints: str, reuse: bool) -> dict:
    from pipelines import config as config_lib
    from pipelines import precompute as precompute_phase

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config_lib.load(precompute_phase.PrecomputeConfig, os.path.join(repo, "configs", "precompute-tiny.yaml"), [
        f"input={images}", f"output={latents}", f"data_root={os.path.dirname(latents)}",
        f"encoders.text={checkpoints}/text", f"encoders.stage_a={checkpoints}/stage_a", "outputs=[text, stage_a]",
        "stage_a_resolution=64", "batch_size=16", f"reuse={'true' if reuse else 'false'}",
        "mlflow.system_metrics=false"])
    started = time.perf_counter()
    result = precompute_phase.run(cfg)
    return {"seconds": time.perf_counter() - started, "written": result.counts["written"],
            "encoded": result.counts["encoded"], "reused": result.counts["reused"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--gone", type=float, default=0.1)
    parser.add_argument("--shard-size", type=int, default=40)
    parser.add_argument("--precompute", action="store_true")
    args = parser.parse_args()

    import img2dataset.downloader  # noqa: F401 - imported before any timing

    from pipelines.runtime import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=2))
    server = Server()
    work = tempfile.mkdtemp(prefix="wurst-bench-refilter-")
    try:
        rows = laion_rows(args.rows, args.gone, server.port)
        filtered = os.path.join(work, "filtered")
        shared = os.path.join(work, "shared", "images")
        results, latents = [], []
        checkpoints = os.path.join(work, "checkpoints")
        if args.precompute:
            import torch

            import stages
            from stages.stage_a import StageA, StageAConfig
            from stages.text import TextEncoder, TextEncoderConfig

            torch.manual_seed(0)
            stages.save(TextEncoder(TextEncoderConfig.tiny()), os.path.join(checkpoints, "text"))
            stages.save(StageA(StageAConfig.tiny()), os.path.join(checkpoints, "stage_a"))
        for label, threshold in (("first run", 4.5), ("tighter", 5.5), ("looser", 4.0)):
            input_dir, n = filter_version(filtered, rows, threshold)
            with_reuse = download(server, input_dir, shared, args.shard_size, reuse=True)
            alone_images = os.path.join(work, f"alone-{threshold}", "images")
            alone = download(server, input_dir, alone_images, args.shard_size, reuse=False)
            results.append((label, threshold, with_reuse, alone))
            if args.precompute:
                latents.append((label, precompute(with_reuse["output"], os.path.join(work, "shared", "latents"),
                                                  checkpoints, reuse=True),
                                precompute(alone["output"], os.path.join(work, f"alone-{threshold}", "latents"),
                                           checkpoints, reuse=False)))
        first = results[0][2]
        print(f"{args.rows} rows, {args.gone:.0%} of URLs 404, shard size {args.shard_size}; loopback server")
        print(f"{'run':<10} {'aesth':>5} {'rows':>5} {'reused':>6} | {'requests':>8} {'KB':>7} {'s':>6} | "
              f"without reuse: {'requests':>8} {'KB':>7} {'s':>6} | requests vs first run")
        for label, threshold, r, a in results:
            print(f"{label:<10} {threshold:>5} {r['rows']:>5} {r['reused']:>6} | {r['requests']:>8} "
                  f"{r['bytes'] / 1024:>7.0f} {r['seconds']:>6.2f} | {'':>15}{a['requests']:>8} "
                  f"{a['bytes'] / 1024:>7.0f} {a['seconds']:>6.2f} | {r['requests'] / first['requests']:.2f}")
        if latents:
            print(f"\nprecompute (tiny encoders, CPU): {'run':<10} {'written':>7} {'encoded':>7} {'reused':>6} {'s':>6} | "
                  f"without reuse: {'encoded':>7} {'s':>6}")
            for label, r, a in latents:
                print(f"{'':<32} {label:<10} {r['written']:>7} {r['encoded']:>7} {r['reused']:>6} {r['seconds']:>6.2f} | "
                      f"{'':>15}{a['encoded']:>7} {a['seconds']:>6.2f}")
    finally:
        server.httpd.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
