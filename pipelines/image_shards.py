"""The image-shard format (a `download` output: img2dataset webdataset shards), and its reader.

Longer than 500 lines: both shard layouts (tars, and selections over earlier versions' tars) with the reads
of each, kept next to the one reader and ordering contract every phase uses.

One module for what a download output looks like, used by the phase that writes it and by those that
read it: the shard files (``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``, the stats last),
tar members grouped into samples by key, the image extensions, per-shard counts. No torch at import:
precompute's CPU tasks read tars through this module (`ImageShardDataset` is made on first use, see
`pipelines.lazy_dataset`).

Reader, for Stage A training
----------------------------

``ImageShardDataset(uri, rank, world_size, seed, start_offset, batch_size, image_size, crop_size)`` is a
``torch.utils.data.IterableDataset`` yielding batches ``{"images": (B, 3, crop, crop) float in [0, 1],
"key": [str]}``: each image is resized so its shorter side is ``image_size`` and cropped at a random
position to ``crop_size`` (paper: 128 px crops of images resized to 256).

Ordering contract (the one ``pipelines.latent_shards`` documents, with whole shards as blocks)
------------------------------------------------------------------------------------------------
* N images are the members of the ``NNNNN.tar`` shards (sorted by name) with an image extension, in
  tar order; per-shard counts come from ``NNNNN_stats.json`` ("successes"), else from the shard's
  parquet (status == "success"), else from scanning the tar. A shard with a selection
  (``NNNNN_selection.parquet``, a version that reuses earlier downloads) is its selected samples in the
  selection's order, read by range from whichever tar holds them (see "Selections").
* Epoch ``e``: shards permuted with ``numpy.random.default_rng([seed, e])`` and concatenated; rank r
  of W takes the contiguous range ``[r*M, (r+1)*M)``, ``M = N // W``; the range is cut into windows of
  ``shuffle_window`` samples, each permuted with ``default_rng([seed, e, r, W, window])``.
* The rank's stream is its epoch sequences back to back, started ``start_offset`` samples in; batch
  ``j`` of the stream goes to DataLoader worker ``j % K``, so ``DataLoader(ds, batch_size=None,
  num_workers=K)`` returns the stream in order for any K.
* The crop of the sample at stream position p of epoch e comes from ``default_rng([seed, e, p])``:
  a resumed run crops exactly like an uninterrupted one, without saving any RNG state.
Tar member offsets are read lazily, only for the shards this rank actually reads.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import posixpath
import tarfile
from typing import Any, Iterator, Optional

import numpy as np

from pipelines import lazy_dataset, storage
from pipelines.phase import InputError

# Image members of a sample, by extension (lower case), in the order a sample's image is looked for.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = tuple("." + ext for ext in IMAGE_EXTENSIONS)
# The PIL formats `Image.open(..., formats=...)` may identify. Unrestricted, PIL tries every plugin it has,
# among them EPS (which runs Ghostscript on load when it is installed) and other rarely audited decoders.
# WEB_IMAGE_FORMATS: what the downloader accepts from the web; SHARD_IMAGE_FORMATS: what shards hold (the
# downloader re-encodes to jpg / png / webp).
WEB_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG also opens MPO (multi-picture JPEG)
SHARD_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


log = logging.getLogger(__name__)

# A tar that ends early (an interrupted upload, a full disk): the samples it lost are yielded by
# `iter_tar_samples` as placeholders holding only this part (the detail, UTF-8), so readers count them
# under TRUNCATED_TAR instead of failing the whole phase or losing them silently.
TRUNCATED_TAR = "truncated_tar"
TRUNCATED_PART = "__truncated_tar__"


class ImageShardError(InputError):
    """The image shards are not what the reader expects; the message names the file."""


# ------------------------------------------------------------------------------------------------
# Shard files


def shard_name_digits(num_shards: int) -> int:
    """Digits of the zero-padded shard names (``00007``): at least 5, as img2dataset writes them."""
    return max(5, len(str(max(num_shards - 1, 0))))


def shard_files(root: str, name: str) -> dict[str, str]:
    """The files of shard `name` (e.g. ``00007``) of a download output: the webdataset tar,
    img2dataset's per-row results (parquet), the selection (a version that reuses earlier downloads, see
    "Selections" below) and its stats (written last: the shard is complete)."""
    return sibling_files(storage.join(root, f"{name}.tar"))


def sibling_files(tar_uri: str) -> dict[str, str]:
    # An object-store URI's options (?endpoint_override=...) stay after the path of each sibling.
    base, options = storage.split_options(tar_uri) if storage.is_remote(tar_uri) else (tar_uri, "")
    stem = base[: -len(".tar")]
    return {"tar": tar_uri, "parquet": stem + ".parquet" + options, "selection": stem + SELECTION_SUFFIX + options,
            "stats": stem + "_stats.json" + options}


def list_shards(uri: str) -> list[str]:
    """What a reader reads of a download version, one entry per shard in name order: the shard's selection
    (``NNNNN_selection.parquet``) where it has one, else its tar. Never a tar that a selection stands for."""
    files = storage.list_files(uri, suffix=(".tar", SELECTION_SUFFIX))
    selections = {source_name(f) for f in files if is_selection(f)}
    shards = [f for f in files if is_selection(f) or source_name(f) not in selections]
    if not shards:
        raise ImageShardError(f"{uri}: no .tar shards (expected img2dataset webdataset output)")
    return sorted(shards)


def is_selection(source: str) -> bool:
    return storage.split_options(str(source))[0].endswith(SELECTION_SUFFIX)


def source_name(source: str) -> str:
    """``NNNNN`` of a shard source (its tar or its selection)."""
    base = storage.basename(source)
    return base[: -len(SELECTION_SUFFIX)] if is_selection(base) else base[: -len(".tar")]


# ------------------------------------------------------------------------------------------------
# Selections: a download version that refers to samples of earlier versions instead of copying them
#
# A download of a new filter version fetches only the rows no earlier download of the same source holds
# (`pipelines.download`); each of its shards then has ``NNNNN_selection.parquet``: one row per input row of
# the shard, in input order, with its ``uid``, the version's ``key`` for it, ``status`` (success / failed),
# ``reason`` (a failure's), ``origin`` (fetched: by this version; reused: from an earlier one), and for a
# success the tar that holds its bytes (``tar``, relative to the images root: ``<version>/NNNNN.tar``, this
# version's own or an earlier one's) and ``members`` (JSON: extension -> [data offset, size] in that tar). The
# shard's samples are its success rows in file order; a reader range-reads exactly their members, never a
# tar's other samples.

SELECTION_SUFFIX = "_selection.parquet"
SELECTION_SCHEMA_FIELDS = (("uid", "string"), ("key", "string"), ("status", "string"), ("reason", "string"),
                           ("origin", "string"), ("tar", "string"), ("members", "string"))
# Two selected samples of one tar whose members lie at most this far apart are read in one range read
# (the gap is read, never decoded).
COALESCE_GAP_BYTES = 16 * 1024


def selection_schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in SELECTION_SCHEMA_FIELDS])


def _images_root(selection_uri: str) -> str:
    # storage.parent keeps an object-store URI's options (?endpoint_override=...) after the path.
    return storage.parent(storage.parent(storage.normalize(selection_uri)))


def resolve_tar(selection_uri: str, relative: str) -> str:
    """The URI of a tar a selection names (relative to the images root the selection's version is in)."""
    return storage.join(_images_root(selection_uri), *relative.split("/"))


def read_selection(uri: str, successes_only: bool = True) -> list[dict]:
    """The rows of a selection file, in order (by default only its samples: the success rows)."""
    import pyarrow.parquet as pq

    with storage.open_input(uri) as handle:
        rows = pq.read_table(handle).to_pylist()
    return [r for r in rows if r["status"] == "success"] if successes_only else rows


def selection_count(uri: str) -> int:
    import pyarrow.parquet as pq

    with storage.open_input(uri) as handle:
        status = pq.read_table(handle, columns=["status"]).column("status").to_pylist()
    return sum(1 for s in status if s == "success")


def selection_members(uri: str) -> list[tuple[str, str, dict[str, tuple[int, int]]]]:
    """(tar URI, key, {extension: (offset, size)}) per sample of a selection, in order."""
    out = []
    for row in read_selection(uri):
        members = {ext: (int(o), int(n)) for ext, (o, n) in json.loads(row["members"]).items()}
        out.append((resolve_tar(uri, row["tar"]), row["key"], members))
    return out


def iter_selection_samples(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a selection, in order: range reads of exactly the selected
    members (neighbours in one tar within COALESCE_GAP_BYTES share one read). A sample whose bytes cannot be
    read (its tar is shorter than recorded, or gone) is yielded as a TRUNCATED_PART placeholder."""
    samples = selection_members(uri)
    handles: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def handle_for(tar: str):
        if tar not in handles:
            handles[tar] = storage.open_input(tar)
            while len(handles) > 8:
                handles.popitem(last=False)[1].close()
        handles.move_to_end(tar)
        return handles[tar]

    try:
        i = 0
        while i < len(samples):
            tar, _, members = samples[i]
            lo = min(o for o, _ in members.values())
            hi = max(o + n for o, n in members.values())
            j = i + 1
            while j < len(samples) and samples[j][0] == tar:
                nxt = samples[j][2]
                n_lo, n_hi = min(o for o, _ in nxt.values()), max(o + n for o, n in nxt.values())
                if not 0 <= n_lo - hi <= COALESCE_GAP_BYTES:
                    break
                hi = n_hi
                j += 1
            try:
                handle = handle_for(tar)
                data = handle.read_at(hi - lo, lo)
                if len(data) != hi - lo:
                    raise EOFError(f"{len(data)} of {hi - lo} bytes at offset {lo}")
            except (OSError, EOFError, ValueError) as exc:
                detail = f"{TRUNCATED_TAR}: {tar}: the selected samples' bytes cannot be read ({exc}) (from {uri})"
                log.warning("%s", detail)
                for _, key, _ in samples[i:j]:
                    yield key, {TRUNCATED_PART: detail.encode("utf-8")}
                i = j
                continue
            for _, key, parts in samples[i:j]:
                yield key, {ext: data[o - lo:o - lo + n] for ext, (o, n) in parts.items()}
            i = j
    finally:
        for handle in handles.values():
            handle.close()


def iter_shard_samples(source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard source of `list_shards`: a selection's, or a tar's (`iter_tar_samples`)."""
    return iter_selection_samples(source) if is_selection(source) else iter_tar_samples(source)


def member_sample(member: tarfile.TarInfo) -> Optional[tuple[str, str]]:
    """(sample key, lower-cased extension) of a tar member: a file named <key>.<ext> (the key is the path up to
    the first dot of the file name); None for anything else."""
    if not member.isfile():
        return None
    directory, name = posixpath.split(member.name)
    if "." not in name:
        return None
    stem, ext = name.split(".", 1)
    return posixpath.join(directory, stem), ext.lower()


def tar_member_index(tar_uri: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (data offset, size)} of every sample of a tar (headers only)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    with storage.open_input(tar_uri) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for member in tar:
            sample = member_sample(member)
            if sample is not None:
                out.setdefault(sample[0], {})[sample[1]] = (member.offset_data, member.size)
    return out


def _scan_tar(path: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, strict: bool = True
              ) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of the image members of a tar, in tar order (headers only).
    strict=False: a tar that ends early gives the members whose data lies wholly before the break."""
    out = []
    with storage.open_input(path) as handle:
        end = handle.size()
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(suffixes):
                        out.append((member.name, member.offset_data, member.size))
        except (tarfile.TarError, EOFError, OSError):
            if strict:
                raise
    return out if strict else [m for m in out if m[1] + m[2] <= end]


def count_tar_samples(tar_uri: str, image_ext: str) -> int:
    """Samples (members named <key>.<image_ext>) in a tar; reads headers only, raises if unreadable."""
    return len(_scan_tar(tar_uri, ("." + image_ext.lower(),)))


def shard_count(tar_path: str) -> int:
    """Number of images in a shard (a tar or a selection, see `list_shards`), from img2dataset's side files
    when present."""
    if is_selection(tar_path):
        return selection_count(tar_path)
    files = sibling_files(tar_path)
    stats = files["stats"]
    if storage.exists(stats):
        data = storage.read_json(stats)
        if isinstance(data.get("successes"), int):
            return int(data["successes"])
    table_path = files["parquet"]
    if storage.exists(table_path):
        import pyarrow.parquet as pq

        with storage.open_input(table_path) as handle:
            table = pq.read_table(handle, columns=["status"])
        return int(sum(1 for s in table.column("status").to_pylist() if s == "success"))
    return len(_scan_tar(tar_path))


def count_images(uri: str) -> int:
    return sum(shard_count(s) for s in list_shards(uri))


def recorded_samples(tar_uri: str) -> Optional[int]:
    """The samples a shard's side files say its tar holds (stats, else the results parquet), or None."""
    files = sibling_files(tar_uri)
    try:
        if storage.exists(files["stats"]) or storage.exists(files["parquet"]):
            return shard_count(tar_uri)
    except (OSError, ValueError, KeyError):
        pass
    return None


def truncated_detail(parts: dict[str, bytes]) -> Optional[str]:
    """The detail of a placeholder for a sample a truncated tar lost, or None for a real sample."""
    data = parts.get(TRUNCATED_PART)
    return data.decode("utf-8", errors="replace") if data is not None else None


def iter_tar_samples(uri: str, expected: Optional[int] = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar, in tar order, reading it once as a
    stream. Members of a sample are consecutive and share the key (path up to the first dot of the
    file name); extensions are lower-cased.

    A tar that ends early keeps what came before the break: every complete sample, and of the sample the
    break cut, the members read whole (a reader's own checks count it when a part is missing). Then one
    placeholder `(<shard>/lost-<i>, {TRUNCATED_PART: detail})` follows per sample the shard is known to
    have lost: `expected` (default: the shard's side files, `recorded_samples`) minus those yielded; at
    least one when the tar was unreadable and the number is unknown."""
    count = 0
    key, parts = None, {}
    error: Optional[BaseException] = None
    try:
        with storage.open_input(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                sample = member_sample(member)
                if sample is None:
                    continue
                member_key, ext = sample
                if member_key != key and key is not None:
                    yield key, parts
                    count += 1
                    parts = {}
                key = member_key
                handle = tar.extractfile(member)
                parts[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:  # a truncated or corrupt tar
        error = exc
    if key is not None and parts:
        yield key, parts
        count += 1
    if expected is None:
        expected = recorded_samples(uri)
    lost = (expected - count) if expected is not None else 0
    if error is not None:
        lost = max(lost, 1)
    if lost <= 0:
        return
    why = f"unreadable after {count} samples ({error})" if error is not None else f"ends after {count} samples"
    detail = (f"{TRUNCATED_TAR}: {uri} {why}; " + (f"{lost} of its {expected} samples lost" if expected is not None
                                                     else "an unknown number of samples lost (counted as one)"))
    log.warning("%s", detail)
    stem = posixpath.splitext(posixpath.basename(str(uri)))[0]
    for i in range(lost):
        yield f"{stem}/lost-{i:06d}", {TRUNCATED_PART: detail.encode("utf-8")}


# ------------------------------------------------------------------------------------------------
# Reading, for Stage A training


def decode_and_crop(data: bytes, image_size: int, crop_size: int, rng: np.random.Generator, source: str) -> np.ndarray:
    """JPEG/PNG bytes -> (3, crop, crop) float32 in [0, 1]: shorter side resized to image_size, random crop."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=SHARD_IMAGE_FORMATS) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = image_size / min(w, h)
            size = (max(crop_size, round(w * scale)), max(crop_size, round(h * scale)))
            image = image.resize(size, Image.BICUBIC, reducing_gap=None)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except Exception as exc:  # noqa: BLE001 - named and re-raised
        raise ImageShardError(f"{source}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    top = int(rng.integers(0, pixels.shape[0] - crop_size + 1))
    left = int(rng.integers(0, pixels.shape[1] - crop_size + 1))
    return np.ascontiguousarray(pixels[top:top + crop_size, left:left + crop_size].transpose(2, 0, 1))


def __getattr__(name: str):
    if name == "ImageShardDataset":
        return lazy_dataset.iterable_dataset(globals(), name, ImageShardReader)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ImageShardReader:
    """The methods of `ImageShardDataset` (a torch IterableDataset subclass of this class); see the module."""

    def __init__(self, uri: str, *, rank: int = 0, world_size: int = 1, seed: int = 0, start_offset: int = 0,
                 batch_size: int = 1, image_size: int = 256, crop_size: int = 128, shuffle_window: int = 1024,
                 open_index: int = 64):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ImageShardError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if crop_size > image_size:
            raise ImageShardError(f"crop_size {crop_size} is larger than image_size {image_size}")
        self.uri = storage.normalize(uri)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_offset, self.batch_size = start_offset, batch_size
        self.image_size, self.crop_size, self.shuffle_window = image_size, crop_size, shuffle_window
        self.shards = list_shards(self.uri)
        self.counts = np.asarray([shard_count(s) for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self.samples_per_epoch = self.num_samples // world_size
        if self.samples_per_epoch == 0:
            raise ImageShardError(f"{self.uri}: {self.num_samples} images cannot be split over {world_size} ranks")
        self.open_index = open_index
        self._index: collections.OrderedDict[int, list[tuple[str, int, int]]] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_index"] = collections.OrderedDict()
        return state

    # ------------------------------------------------------------------ order
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return order, np.cumsum(self.counts[order])

    def positions(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(epoch, stream position, shard, index in shard) of stream positions [start, stop)."""
        out = []
        per_epoch = self.samples_per_epoch
        layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        perms: dict[tuple[int, int], np.ndarray] = {}
        for p in range(start, stop):
            epoch, q = divmod(p, per_epoch)
            window, inner = divmod(q, self.shuffle_window)
            if epoch not in layouts:
                layouts[epoch] = self._epoch_layout(epoch)
            order, ends = layouts[epoch]
            key = (epoch, window)
            if key not in perms:
                length = min(self.shuffle_window, per_epoch - window * self.shuffle_window)
                perms[key] = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, window]).permutation(length)
            seq = self.rank * per_epoch + window * self.shuffle_window + int(perms[key][inner])
            slot = int(np.searchsorted(ends, seq, side="right"))
            shard = int(order[slot])
            index = seq - int(ends[slot] - self.counts[shard])
            out.append((epoch, p, shard, index))
        return out

    # ------------------------------------------------------------------ reading
    def _members(self, shard: int) -> list[tuple[str, str, int, int]]:
        """(tar URI, member name, data offset, size) of the shard's images, in the shard's order."""
        members = self._index.get(shard)
        if members is None and is_selection(self.shards[shard]):
            # A selection: exactly its samples' image members, wherever they lie (no tar header is read).
            members = []
            for tar, key, parts in selection_members(self.shards[shard]):
                ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
                if ext is None:
                    raise ImageShardError(f"{self.shards[shard]}: sample {key} has no image member ({sorted(parts)})")
                members.append((tar, f"{key}.{ext}", *parts[ext]))
            if len(members) != self.counts[shard]:
                raise ImageShardError(f"{self.shards[shard]}: {len(members)} samples, counted {int(self.counts[shard])}")
            self._index[shard] = members
            while len(self._index) > self.open_index:
                self._index.popitem(last=False)
        if members is None:
            members = [(self.shards[shard], *m) for m in _scan_tar(self.shards[shard], strict=False)]
            if not members or len(members) > self.counts[shard]:
                raise ImageShardError(f"{self.shards[shard]}: {len(members)} readable images in the tar, its stats "
                                      f"say {int(self.counts[shard])}")
            if len(members) < self.counts[shard]:
                # A truncated tar: the images before the break stand in, in turn, for those it lost, so the
                # stream's positions (and a resume) stay as the ordering contract fixes them.
                lost = int(self.counts[shard]) - len(members)
                log.warning("%s: %s: %d of %d images lost; their stream positions reuse the %d readable ones",
                            TRUNCATED_TAR, self.shards[shard], lost, int(self.counts[shard]), len(members))
            self._index[shard] = members
            while len(self._index) > self.open_index:
                self._index.popitem(last=False)
        return members

    def load(self, epoch: int, position: int, shard: int, index: int) -> tuple[np.ndarray, str]:
        members = self._members(shard)
        tar, name, offset, size = members[index % len(members)]
        with storage.open_input(tar) as handle:
            data = handle.read_at(size, offset)
        rng = np.random.default_rng([self.seed, epoch, position])
        source = f"{tar}:{name}"
        return decode_and_crop(data, self.image_size, self.crop_size, rng, source), name.rsplit(".", 1)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        batch = 0
        while True:
            if batch % n_workers == worker:
                start = self.start_offset + batch * self.batch_size
                items = [self.load(*pos) for pos in self.positions(start, start + self.batch_size)]
                yield {"images": torch.from_numpy(np.stack([i[0] for i in items])), "key": [i[1] for i in items]}
            batch += 1
