"""The built-in demo dataset: procedurally drawn images + LAION-format metadata + a loopback server.

Images are coloured shapes (circle, square, triangle, ...) at a position on a background, with a
caption that describes them ("a red circle at the top left on a blue background"), so a small model
can learn something visible in minutes. The metadata parquet has LAION's columns (URL, TEXT, WIDTH,
HEIGHT, AESTHETIC_SCORE, pwatermark, punsafe, similarity) and deliberately contains rows that the
filters remove (low aesthetic, too small, watermarked, unsafe, duplicate URLs, bad captions) and
URLs that fail on download (404, corrupt bytes), so the funnel and the failure accounting are
visible for real.

`python -m pipelines.demo_data --out data/demo [--n 2000]` writes:
  <out>/images/*.png, <out>/metadata/part-0000{0,1}.parquet, <out>/demo.json (port, counts)
`serve(root)` starts the loopback HTTP server the URLs point at.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import socket
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128),
               "light blue": (170, 210, 240), "beige": (230, 220, 190)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
             "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
SIZES = {"small": 0.14, "large": 0.26}

DEMO_FILE = "demo.json"


def draw(shape: str, colour: str, background: str, position: str, size: str, px: int, rng) -> "Image":
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (px, px), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    cx, cy = (cx + jitter[0]) * px, (cy + jitter[1]) * px
    r = SIZES[size] * px
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(out: str, n: int = 2000, px: int = 256, seed: int = 0, port: int | None = None) -> dict:
    """Write images, metadata and demo.json; returns the demo.json content. Idempotent for the same
    arguments (same seed -> same bytes), so reruns of the demo see an unchanged input."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out, "images")
    meta_dir = os.path.join(out, "metadata")
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(meta_dir, exist_ok=True)
    info_path = os.path.join(out, DEMO_FILE)
    if os.path.exists(info_path):
        info = json.load(open(info_path))
        if info.get("n") == n and info.get("px") == px and info.get("seed") == seed:
            return info
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"

    rows = {k: [] for k in ["URL", "TEXT", "WIDTH", "HEIGHT", "AESTHETIC_SCORE", "pwatermark", "punsafe",
                            "similarity"]}
    kinds: dict[str, int] = {}

    def add(url, text, w, h, aesthetic, wm, unsafe, kind):
        rows["URL"].append(url)
        rows["TEXT"].append(text)
        rows["WIDTH"].append(w)
        rows["HEIGHT"].append(h)
        rows["AESTHETIC_SCORE"].append(aesthetic)
        rows["pwatermark"].append(wm)
        rows["punsafe"].append(unsafe)
        rows["similarity"].append(float(rng.uniform(0.28, 0.4)))
        kinds[kind] = kinds.get(kind, 0) + 1

    names_c, names_b = list(COLOURS), list(BACKGROUNDS)
    for i in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = names_c[rng.integers(len(names_c))]
        background = names_b[rng.integers(len(names_b))]
        if colour == background:
            background = "grey"
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        caption = f"a {size} {colour} {shape} at the {position} on a {background} background"
        name = f"img{i:05d}.png"
        path = os.path.join(img_dir, name)
        if not os.path.exists(path):
            draw(shape, colour, background, position, size, px, rng).save(path, optimize=False)
        else:
            rng.uniform(-0.04, 0.04, size=2)  # keep the random stream identical on reruns
        url = f"{base}/images/{name}"
        aesthetic, wm, unsafe, w, h = float(rng.uniform(5.2, 7.5)), float(rng.uniform(0, 0.3)), \
            float(rng.uniform(0, 0.2)), px, px
        # Rows the filter must remove, at known rates.
        kind = "good"
        roll = rng.random()
        if roll < 0.06:
            aesthetic, kind = float(rng.uniform(3.0, 4.9)), "low_aesthetic"
        elif roll < 0.10:
            w, h, kind = px // 4, px // 4, "too_small"
        elif roll < 0.13:
            wm, kind = float(rng.uniform(0.6, 0.99)), "watermarked"
        elif roll < 0.15:
            unsafe, kind = 0.995, "unsafe"
        add(url, caption, w, h, aesthetic, wm, unsafe, kind)
        if rng.random() < 0.05:  # an exact duplicate URL (with a different caption and score)
            add(url, caption.replace(" on a ", " over a "), w, h, aesthetic - 0.1, wm, unsafe, "duplicate")
    # URLs that pass the filters but fail to download.
    for j in range(max(1, n // 50)):
        add(f"{base}/missing/m{j:04d}.png", "a blue circle at the centre on a white background", px, px, 6.0,
            0.1, 0.1, "http_404")
    for j in range(max(1, n // 100)):
        add(f"{base}/corrupt/c{j:04d}.jpg", "a red square at the top left on a black background", px, px, 6.0,
            0.1, 0.1, "corrupt")
    with open(os.path.join(out, "corrupt.bin"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 600, dtype=np.uint8)))
    # One caption the caption rules drop.
    add(f"{base}/images/img00000.png", "shape", px, px, 6.0, 0.1, 0.1, "short_caption")

    table = pa.table({
        "URL": pa.array(rows["URL"], pa.string()),
        "TEXT": pa.array(rows["TEXT"], pa.string()),
        "WIDTH": pa.array(rows["WIDTH"], pa.int32()),
        "HEIGHT": pa.array(rows["HEIGHT"], pa.int32()),
        "AESTHETIC_SCORE": pa.array(rows["AESTHETIC_SCORE"], pa.float64()),
        "pwatermark": pa.array(rows["pwatermark"], pa.float64()),
        "punsafe": pa.array(rows["punsafe"], pa.float64()),
        "similarity": pa.array(rows["similarity"], pa.float64()),
    })
    order = rng.permutation(table.num_rows)
    table = table.take(pa.array(order))
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), os.path.join(meta_dir, "part-00000.parquet"))
    pq.write_table(table.slice(half), os.path.join(meta_dir, "part-00001.parquet"))
    info = {"n": n, "px": px, "seed": seed, "port": port, "base_url": base, "rows": table.num_rows,
            "kinds": kinds, "metadata": meta_dir}
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    return info


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/corrupt/"):
            data = open(os.path.join(self.directory, "corrupt.bin"), "rb").read()
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()


def serve(root: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve the demo dataset on 127.0.0.1:port in a daemon thread; returns the server (shutdown())."""
    handler = functools.partial(_Handler, directory=os.path.abspath(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="demo-http").start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(generate(args.out, args.n, args.px, args.seed), indent=2))


if __name__ == "__main__":
    main()
