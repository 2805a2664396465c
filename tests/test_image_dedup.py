"""Image de-duplication by content (issue 20, the decisions): planted copies of an image -- re-encoded as JPEG,
resized, saved as PNG -- are found; the demo dataset's drawings, which look alike by design (one layout, another
colour or shape), are not merged at the default thresholds; the band buckets find every near pair a full
comparison finds; groups keep the best sample and name what each removed one duplicates."""

from __future__ import annotations

import io
import itertools

import numpy as np
from PIL import Image

from data_filters import image_dedup
from pipelines import demo_data


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int, size: int = 256) -> Image.Image:
    """A smooth photo-like image (random low-frequency colour field plus texture)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    channels = [sum(rng.uniform(0.2, 1) * np.sin(rng.uniform(1, 6) * xx * 6 + rng.uniform(1, 6) * yy * 6
                                                  + rng.uniform(0, 6)) for _ in range(3)) for _ in range(3)]
    pixels = np.stack([(c - c.min()) / (np.ptp(c) + 1e-9) for c in channels], axis=-1)
    pixels = pixels * 220 + rng.normal(0, 6, pixels.shape) + 15
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _drawings() -> list[np.ndarray]:
    """The demo's look-alikes: one layout in several colours, one colour in several shapes and positions."""
    rng = np.random.default_rng(0)
    out = []
    for colour, shape, position in itertools.product(list(demo_data.COLOURS)[:4], demo_data.SHAPES[:3],
                                                     list(demo_data.POSITIONS)[:2]):
        out.append(np.asarray(demo_data.draw(shape, colour, "white", position, "large", 128, rng).convert("RGB")))
    return out


def _copies(image: Image.Image) -> list[np.ndarray]:
    half = image.resize((image.width // 2, image.height // 2), Image.BICUBIC)
    return [_decode(_encode(image, "JPEG", quality=70)), _decode(_encode(half, "JPEG", quality=85)),
            _decode(_encode(image, "PNG")), np.asarray(image.resize((200, 200), Image.LANCZOS))]


def test_planted_copies_are_near_and_look_alikes_are_not():
    originals = [_photo(s) for s in range(6)]
    worst_copy = 0
    for image in originals:
        reference = np.asarray(image)
        h, c = image_dedup.perceptual_hash(reference), image_dedup.colour_grid(reference)
        for copy in _copies(image):
            distance = int(image_dedup.hamming([h], [image_dedup.perceptual_hash(copy)])[0])
            colour = float(np.abs(c.astype(float) - image_dedup.colour_grid(copy)).max())
            worst_copy = max(worst_copy, distance)
            assert distance <= image_dedup.DEFAULT_MAX_DISTANCE and colour <= image_dedup.DEFAULT_MAX_COLOUR
    # Different photos, and the demo's look-alike drawings: no pair passes both tests.
    pictures = [np.asarray(i) for i in originals] + _drawings()
    hashes = np.array([image_dedup.perceptual_hash(p) for p in pictures], dtype=np.uint64)
    colours = np.stack([image_dedup.colour_grid(p) for p in pictures])
    pairs = image_dedup.near_pairs(np.arange(len(pictures)), hashes, image_dedup.DEFAULT_MAX_DISTANCE, colours)
    assert len(pairs) == 0, pairs
    assert worst_copy <= image_dedup.DEFAULT_MAX_DISTANCE


def test_pixel_digest_is_exact():
    image = _photo(7)
    png = _decode(_encode(image, "PNG"))
    assert image_dedup.pixel_digest(png) == image_dedup.pixel_digest(np.asarray(image))  # lossless re-save
    assert image_dedup.pixel_digest(_decode(_encode(image, "JPEG", quality=95))) != image_dedup.pixel_digest(png)


def test_band_buckets_find_every_pair_a_full_comparison_finds():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64)
    # Each base hash with variants 0..8 bits away.
    hashes, origin = [], []
    for i, h in enumerate(base):
        for flips in range(0, 9, 2):
            bits = rng.choice(64, flips, replace=False)
            hashes.append(h ^ np.uint64(sum(1 << int(b) for b in bits)))
            origin.append(i)
    hashes = np.array(hashes, dtype=np.uint64)
    for distance in (3, 6):
        found = {tuple(p) for p in image_dedup.near_pairs(np.arange(len(hashes)), hashes, distance).tolist()}
        i, j = np.triu_indices(len(hashes), k=1)
        close = image_dedup.hamming(hashes[i], hashes[j]) <= distance
        assert found == set(zip(i[close].tolist(), j[close].tolist()))


def test_groups_keep_the_best_and_name_the_duplicate_of():
    uids = ["a", "b", "c", "d", "e"]
    group = image_dedup.groups(5, np.array([[0, 2], [2, 3]]))
    assert group.tolist() == [0, 1, 0, 0, 4]
    removed = image_dedup.keep_best(uids, group, [[5.0, 6.0, 7.0, 7.0, 1.0], [1, 1, 100, 200, 1]])
    # Group {a, c, d}: c and d tie on aesthetic, d has more pixels.
    assert removed.to_pylist() == [{"uid": "a", "duplicate_of": "d"}, {"uid": "c", "duplicate_of": "d"}]
