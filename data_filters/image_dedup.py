"""Image de-duplication by content: exact copies by their decoded pixels, near copies by a perceptual hash.

Pure functions (numpy / pyarrow): `pixel_digest` and `perceptual_hash` per decoded image; `band_keys` cut each
64-bit hash into `max_distance + 1` bands, so two hashes within `max_distance` bits share at least one band
(pigeonhole) and candidate pairs are found inside (band, value) buckets, which partition by key like the URL
de-dup and never need all hashes in one place; `near_pairs` verifies candidates by Hamming distance (and a coarse colour grid, which the luminance hash
lacks); `groups`
joins pairs into duplicate groups (union-find) and `keep_best` names the kept sample of each and why the others
go (`duplicate_of <uid>`).

Why decoded pixels for exact copies, not bytes: the same image re-saved (another container, metadata stripped,
a lossless re-encode) has other bytes and the same pixels; why a DCT hash for near copies: JPEG re-encoding and
resizing move a 32x32 luminance thumbnail's low frequencies little, while a different image (other colours,
another layout) flips many of the 63 sign bits.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pyarrow as pa

HASH_SIZE = 8  # 8 x 8 low DCT coefficients -> 64 bits (the DC term replaced by the mean test)
THUMB = 32
DEFAULT_MAX_DISTANCE = 6  # bits of 64; tests/test_image_dedup.py measures copies vs look-alikes


def pixel_digest(pixels: np.ndarray) -> bytes:
    """sha256 of decoded uint8 RGB pixels (h, w, 3) and their shape: equal iff the images are pixel-identical."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return hashlib.sha256(np.asarray(pixels.shape, dtype=np.int64).tobytes() + pixels.tobytes()).digest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(THUMB)


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit pHash of uint8 RGB (h, w, 3): luminance, area-resized to 32x32, 2-D DCT, the 8x8 lowest
    frequencies compared with their median (bit 63 = coefficient (0, 0))."""
    from PIL import Image

    gray = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("L")
    thumb = np.asarray(gray.resize((THUMB, THUMB), Image.BOX), dtype=np.float64)
    low = (_DCT @ thumb @ _DCT.T)[:HASH_SIZE, :HASH_SIZE].reshape(-1)
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def colour_grid(pixels: np.ndarray) -> np.ndarray:
    """(48,) uint8: the mean RGB of a 4x4 grid. The luminance hash is blind to hue (a red and a blue square of
    one layout hash alike); copies keep their colours, so a near pair must agree here too."""
    from PIL import Image

    small = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("RGB").resize((4, 4), Image.BOX)
    return np.asarray(small, dtype=np.uint8).reshape(-1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between uint64 hashes (element-wise)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def band_keys(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(n, bands) int64 keys: band index in the top byte, the band's bits below. Hashes within max_distance
    bits agree on at least one band (max_distance + 1 bands)."""
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    hashes = np.asarray(hashes, dtype=np.uint64)
    keys = np.empty((len(hashes), bands), dtype=np.int64)
    for b in range(bands):
        width = edges[b + 1] - edges[b]
        value = (hashes >> np.uint64(64 - edges[b + 1])) & np.uint64((1 << width) - 1)
        keys[:, b] = (np.int64(b) << np.int64(56)) | value.astype(np.int64)
    return keys


# The largest difference of one cell's mean colour, of 255: re-encoded / resized copies stay within ~2, the demo's
# look-alike drawings (one layout, another colour) differ by >= 120 where the object is.
DEFAULT_MAX_COLOUR = 24.0


def near_pairs(index: np.ndarray, hashes: np.ndarray, max_distance: int, colours: np.ndarray | None = None,
               max_colour: float = DEFAULT_MAX_COLOUR) -> np.ndarray:
    """(m, 2) pairs (i < j, as given in `index`) of hashes within `max_distance` bits (and, with `colours`,
    colour grids within `max_colour` in every cell), from candidates that share a band key. Memory: the candidates of one
    bucket of keys at a time when called per bucket."""
    index = np.asarray(index, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=np.uint64)
    colours = None if colours is None else np.asarray(colours, dtype=np.float32)
    keys = band_keys(hashes, max_distance)
    pairs = []
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        sorted_keys = keys[order, b]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts.tolist(), ends.tolist()):
            if end - start < 2:
                continue
            members = order[start:end]
            i, j = np.triu_indices(len(members), k=1)
            close = hamming(hashes[members[i]], hashes[members[j]]) <= max_distance
            if colours is not None and close.any():
                close &= np.abs(colours[members[i]] - colours[members[j]]).max(axis=1) <= max_colour
            if close.any():
                a, c = index[members[i][close]], index[members[j][close]]
                pairs.append(np.stack([np.minimum(a, c), np.maximum(a, c)], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


def groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group id per item 0..n-1 (the smallest member's index) from duplicate pairs (union-find)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in np.asarray(pairs, dtype=np.int64).tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def keep_best(uids: Sequence[str], group: np.ndarray, scores: Sequence[Sequence[float]]) -> pa.Table:
    """Per group, the kept sample: highest scores in order (e.g. aesthetic, then pixels), ties by the smallest
    uid. Returns (uid, duplicate_of) for every removed sample, by uid."""
    uids = list(uids)
    rank = sorted(range(len(uids)), key=lambda i: (group[i], *(-float(s[i]) for s in scores), uids[i]))
    removed, kept_of = [], {}
    for i in rank:
        g = int(group[i])
        if g not in kept_of:
            kept_of[g] = uids[i]
        else:
            removed.append((uids[i], kept_of[g]))
    removed.sort()
    return pa.table({"uid": [r[0] for r in removed], "duplicate_of": [r[1] for r in removed]},
                    schema=pa.schema([("uid", pa.string()), ("duplicate_of", pa.string())]))
