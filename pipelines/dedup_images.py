"""`python -m pipelines.dedup_images`: which downloaded images are copies of others, by content.

    python -m pipelines.dedup_images --input data/images/<version> [--set max_distance=6]

After `download` (before `precompute`, which drops the samples it names with `exclude: <this output>`):
1. one Ray task per image shard decodes each image once and writes its hashes to `hashes/<shard>.parquet`
   (uid, pixel digest, 64-bit perceptual hash, 4x4 colour grid, pixels, aesthetic);
2. one task per key bucket (`num_buckets`) reads only the rows whose digest or perceptual-hash bands fall in
   it (each row once per band) and returns the pairs it finds: exact (same pixels) or near (`max_distance`
   bits and `max_colour` per colour cell, `data_filters.image_dedup`); memory per task is one bucket;
3. the driver joins the pairs into groups and keeps per group the best by `keep` (aesthetic, then pixels,
   then uid), writing `duplicates.parquet` (uid, duplicate_of, kind) and a report with sampled pairs.
Every input sample is kept or `duplicate_of <uid>`; the counts add up and are checked.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_filters import image_dedup
from pipelines import image_shards, manifest as manifest_lib, reports, storage, tracking
from pipelines.config import ConfigError, param
from pipelines.phase import Context, InputError, Outcome, Phase, module_cli
from pipelines.runtime import RayConfig, default_data_root

log = logging.getLogger(__name__)
DUPLICATES = "duplicates.parquet"
HASHES_DIR = "hashes"


class DedupImagesError(InputError):
    """The input is not a finished download output, or a shard cannot be read."""


@dataclasses.dataclass
class DedupImagesConfig:
    input: Optional[str] = None  # a finished download output: <data_root>/images/<version>
    output: Optional[str] = None  # default <data_root>/dedup_images
    data_root: str = dataclasses.field(default_factory=default_data_root)
    # Near copies: perceptual hashes within this many bits (of 64) and colour grids within max_colour per cell.
    near: bool = True
    max_distance: int = param(image_dedup.DEFAULT_MAX_DISTANCE, ge=0, le=16)
    max_colour: float = param(image_dedup.DEFAULT_MAX_COLOUR, ge=0, le=255)
    # Kept per group: the highest of these in order (columns of the hashes), ties by the smallest uid.
    keep: list[str] = param(default_factory=lambda: ["aesthetic", "pixels"], choices=["aesthetic", "pixels"])
    num_buckets: int = param(8, ge=1, le=100_000)
    report_pairs: int = param(12, ge=0, le=200)
    # Copy the hashes of samples an earlier dedup_images output (of a download with the same sample settings,
    # e.g. another filter version's) computed, instead of decoding them again. Not part of the version.
    reuse: bool = True
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)

    def validate(self) -> None:
        if not self.keep:
            raise ConfigError("keep: name at least one of aesthetic, pixels")


HASH_COLUMNS = ("digest", "phash", "colour", "pixels")  # what a sample's pixels decide (reusable by uid)


def _pooled_hashes(pooled: Optional[pa.Table]) -> dict[str, tuple]:
    """uid -> (digest, phash, colour, pixels) of the shard's samples an earlier de-dup already hashed."""
    import pyarrow.compute as pc

    out: dict[str, tuple] = {}
    if pooled is None or not pooled.num_rows:
        return out
    for file in sorted(set(pooled.column("file").to_pylist())):
        uids = pooled.filter(pc.equal(pooled.column("file"), file)).column("uid")
        with storage.open_input(file) as handle:
            table = pq.read_table(handle, columns=["uid", *HASH_COLUMNS])
        table = table.filter(pc.is_in(table.column("uid"), value_set=uids.combine_chunks()))
        for r in table.to_pylist():
            out[r["uid"]] = tuple(r[c] for c in HASH_COLUMNS)
    return out


def hash_shard(row: dict[str, Any], out_dir: str, pooled: Optional[pa.Table] = None) -> dict[str, Any]:
    """Ray task: one image shard -> hashes/<shard>.parquet (resumes: an existing file is kept). `pooled`: the
    shard's uids an earlier de-dup of a download with the same sample settings hashed (uid, file): their hashes
    are copied, their images not decoded."""
    from PIL import Image

    source, name = row["source"], row["name"]
    target = storage.join(out_dir, HASHES_DIR, f"{name}.parquet")
    if storage.exists(target):
        return {"name": name, "rows": pq.read_metadata(storage.local_copy(target)).num_rows, "skipped": "{}",
                "reused": 0}
    records: dict[str, list] = {k: [] for k in ("uid", "digest", "phash", "colour", "pixels", "aesthetic", "key")}
    skipped: dict[str, int] = {}
    known = _pooled_hashes(pooled)
    reused = 0
    for key, parts in image_shards.iter_shard_samples(source):
        ext = next((e for e in image_shards.IMAGE_EXTENSIONS if e in parts), None)
        meta = json.loads(parts["json"]) if "json" in parts else {}
        if ext is None or not meta.get("uid"):
            skipped["no_image_or_uid"] = skipped.get("no_image_or_uid", 0) + 1
            continue
        score = meta.get("aesthetic")
        if meta["uid"] in known:
            for column, value in zip(HASH_COLUMNS, known[meta["uid"]]):
                records[column].append(value)
            records["uid"].append(meta["uid"])
            records["key"].append(key)
            records["aesthetic"].append(float(score) if isinstance(score, (int, float)) else float("nan"))
            reused += 1
            continue
        try:
            with Image.open(io.BytesIO(parts[ext]), formats=image_shards.SHARD_IMAGE_FORMATS) as image:
                pixels = np.asarray(image.convert("RGB"))
        except Exception:  # noqa: BLE001 - an undecodable image is counted, precompute names its reason
            skipped["decode_error"] = skipped.get("decode_error", 0) + 1
            continue
        records["uid"].append(meta["uid"])
        records["key"].append(key)
        records["digest"].append(image_dedup.pixel_digest(pixels))
        records["phash"].append(image_dedup.perceptual_hash(pixels) - (1 << 63))  # as int64, order kept
        records["colour"].append(image_dedup.colour_grid(pixels).tobytes())
        records["pixels"].append(int(pixels.shape[0] * pixels.shape[1]))
        records["aesthetic"].append(float(score) if isinstance(score, (int, float)) else float("nan"))
    table = pa.table({"uid": pa.array(records["uid"], pa.string()), "key": pa.array(records["key"], pa.string()),
                      "shard": pa.array([name] * len(records["uid"]), pa.string()),
                      "digest": pa.array(records["digest"], pa.binary(32)),
                      "phash": pa.array(records["phash"], pa.int64()),
                      "colour": pa.array(records["colour"], pa.binary(48)),
                      "pixels": pa.array(records["pixels"], pa.int64()),
                      "aesthetic": pa.array(records["aesthetic"], pa.float64())})
    storage.makedirs(storage.join(out_dir, HASHES_DIR))
    tmp = target + ".tmp"
    pq.write_table(table, storage.resolve(tmp)[1], filesystem=storage.resolve(tmp)[0])
    storage.resolve(tmp)[0].move(storage.resolve(tmp)[1], storage.resolve(target)[1])
    return {"name": name, "rows": table.num_rows, "skipped": json.dumps(skipped), "reused": reused,
            "rss_mib": _peak_rss_mib()}


def _unsigned(phash: np.ndarray) -> np.ndarray:
    return (phash.astype(np.int64).view(np.uint64) + np.uint64(1 << 63)).astype(np.uint64)


def bucket_pairs(row: dict[str, Any], hash_files: list[str], num_buckets: int, near: bool, max_distance: int,
                 max_colour: float) -> dict[str, Any]:
    """Ray task: the pairs among the rows whose digest, or one of whose hash bands, falls in this bucket."""
    bucket = int(row["bucket"])
    offsets, exact, near_found = 0, [], []
    digests, hashes, colours, index = [], [], [], []
    for uri in hash_files:
        with storage.open_input(uri) as handle:
            table = pq.read_table(handle, columns=["digest", "phash", "colour"])
        n = table.num_rows
        digest = table.column("digest").to_pylist()
        mine = [i for i, d in enumerate(digest) if int.from_bytes(d[:8], "big") % num_buckets == bucket]
        digests += [(digest[i], offsets + i) for i in mine]
        if near and n:
            phash = _unsigned(table.column("phash").to_numpy())
            keys = image_dedup.band_keys(phash, max_distance)
            mixed = (keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)
            in_bucket = (mixed % np.uint64(num_buckets)) == np.uint64(bucket)
            rows = np.flatnonzero(in_bucket.any(axis=1))
            if len(rows):
                hashes.append(phash[rows])
                colours.append(np.frombuffer(b"".join(table.column("colour").take(pa.array(rows)).to_pylist()),
                                             dtype=np.uint8).reshape(-1, 48))
                index.append(offsets + rows)
        offsets += n
    by_digest: dict[bytes, int] = {}
    for digest, i in sorted(digests, key=lambda d: d[1]):
        if digest in by_digest:
            exact.append((by_digest[digest], i))
        else:
            by_digest[digest] = i
    if hashes:
        hashes_all, colours_all, index_all = np.concatenate(hashes), np.concatenate(colours), np.concatenate(index)
        pairs = image_dedup.near_pairs(index_all, hashes_all, max_distance, colours_all, max_colour)
        near_found = pairs.tolist()
    return {"bucket": bucket, "exact": json.dumps(exact), "near": json.dumps(near_found), "rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    """The worker process's peak resident memory so far (an upper bound for the task that reports it)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rows_at(files: list[str], counts: list[int], positions: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows at global `positions` (sorted) of the files read in order (`counts` rows each), these columns."""
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tables = []
    for i, file in enumerate(files):
        lo, hi = np.searchsorted(positions, bounds[i]), np.searchsorted(positions, bounds[i + 1])
        if hi > lo:
            with storage.open_input(file) as handle:
                table = pq.read_table(handle, columns=columns)
            tables.append(table.take(pa.array(positions[lo:hi] - bounds[i])))
    if not tables:
        return pa.table({c: pa.array([], pa.string() if c in ("uid", "shard") else pa.float64()) for c in columns})
    return pa.concat_tables(tables)


class DedupImagesPhase(Phase):
    name = "dedup_images"
    config_class = DedupImagesConfig
    output_subdir = "dedup_images"
    description = __doc__.splitlines()[0]
    version_exclude = ("input", "output", "data_root", "num_buckets", "report_pairs", "reuse", "ray", "mlflow")

    def input_uri(self, cfg: DedupImagesConfig) -> str:
        if not cfg.input:
            raise ConfigError("input: required (a finished download output, e.g. data/images/<version>)")
        uri = storage.normalize(cfg.input)
        if not manifest_lib.has_manifest(uri):
            raise ConfigError(f"input: {uri} has no manifest.json; is the download finished?")
        return uri

    def execute(self, ctx: Context) -> Outcome:
        import ray

        cfg, out = ctx.cfg, ctx.output
        storage.makedirs(out)
        sources = image_shards.list_shards(ctx.input_uri)
        items = [{"source": s, "name": image_shards.source_name(s)} for s in sources]
        input_key, pooled = self._pool(ctx, items)
        task = ray.remote(num_cpus=1)(hash_shard)
        hashed = ray.get([task.remote(item, out, pooled.get(item["name"])) for item in items])
        hash_files = [storage.join(out, HASHES_DIR, f"{h['name']}.parquet") for h in hashed]
        skipped: dict[str, int] = {}
        for h in hashed:
            for reason, count in json.loads(h["skipped"]).items():
                skipped[reason] = skipped.get(reason, 0) + count
        pair_task = ray.remote(num_cpus=1)(bucket_pairs)
        found = ray.get([pair_task.remote({"bucket": b}, hash_files, cfg.num_buckets, cfg.near, cfg.max_distance,
                                          cfg.max_colour) for b in range(cfg.num_buckets)])
        exact = {tuple(p) for f in found for p in json.loads(f["exact"])}
        near = {tuple(p) for f in found for p in json.loads(f["near"])} - exact
        n = sum(h["rows"] for h in hashed)
        # Only the samples in some pair are read back (uid, shard, scores): the driver's memory follows the
        # duplicates, not the dataset.
        involved = np.unique(np.array(sorted(exact | near), dtype=np.int64).reshape(-1))
        table = _rows_at(hash_files, [h["rows"] for h in hashed], involved, ["uid", "shard", *cfg.keep])
        local = {int(g): i for i, g in enumerate(involved)}

        def remap(pairs):
            return np.array([(local[a], local[b]) for a, b in sorted(pairs)], dtype=np.int64).reshape(-1, 2)

        group = image_dedup.groups(len(involved), remap(exact | near))
        scores = [np.nan_to_num(table.column(c).to_numpy(zero_copy_only=False).astype(float), nan=-1e9)
                  for c in cfg.keep]
        uids = table.column("uid").to_pylist()
        removed = image_dedup.keep_best(uids, group, scores)
        position = {u: i for i, u in enumerate(uids)}
        exact_groups = image_dedup.groups(len(involved), remap(exact))
        kinds = ["exact" if exact_groups[position[u]] == exact_groups[position[k]] else "near"
                 for u, k in zip(removed.column("uid").to_pylist(), removed.column("duplicate_of").to_pylist())]
        shards = table.column("shard").to_pylist()
        removed = removed.append_column("kind", pa.array(kinds, pa.string())).append_column(
            "shard", pa.array([shards[position[u]] for u in removed.column("uid").to_pylist()], pa.string()))
        pq.write_table(removed, storage.resolve(storage.join(out, DUPLICATES))[1],
                       filesystem=storage.resolve(out)[0])
        counts = {"input_shards": len(sources), "samples": n, "skipped": sum(skipped.values()),
                  "skipped_by_reason": skipped, "duplicates": removed.num_rows,
                  "exact_duplicates": kinds.count("exact"), "near_duplicates": kinds.count("near"),
                  "kept": n - removed.num_rows, "reused_hashes": sum(h.get("reused", 0) for h in hashed)}
        if counts["kept"] + counts["duplicates"] != n:
            raise RuntimeError(f"image de-dup does not add up: {n} samples != kept + duplicates")
        ctx.log_metrics({k: v for k, v in counts.items() if isinstance(v, int)})
        files = self._report(ctx, removed, n, shards, position, sources)
        ctx.log_files(files, reports.REPORT_DIR)
        last_run = {"peak_task_rss_mib": {"hash": max((h.get("rss_mib", 0) for h in hashed), default=0),
                                          "pairs": max((f["rss_mib"] for f in found), default=0)}}
        return Outcome(counts=counts, extra={"duplicates": DUPLICATES, "hashes": HASHES_DIR, "input_reuse_key": input_key,
                                             "last_run": last_run,
                                             "rule": {"near": cfg.near, "max_distance": cfg.max_distance,
                                                      "max_colour": cfg.max_colour, "keep": cfg.keep}})

    def _pool(self, ctx: Context, items: list[dict]) -> tuple[Optional[str], dict[str, pa.Table]]:
        """The input's sample-settings key (`pipelines.download.manifest_reuse_key`), and per shard the uids that
        earlier dedup_images outputs of inputs with that key hashed (uid, file)."""
        from pipelines import download, latent_reuse

        key = download.manifest_reuse_key(manifest_lib.read(ctx.input_uri))
        if not ctx.cfg.reuse or key is None:
            return key, {}
        files = []
        for directory in manifest_lib.earlier_versions(
                storage.parent(ctx.output), ctx.version,
                lambda found: found.get("phase") == self.name and found.get("input_reuse_key") == key):
            files += storage.list_files(storage.join(directory, HASHES_DIR), suffix=".parquet")
        if not files:
            return key, {}
        pieces = []
        for file in files:
            with storage.open_input(file) as handle:
                uids = pq.read_table(handle, columns=["uid"]).column("uid").combine_chunks()
            pieces.append(pa.table({"uid": uids, "file": pa.array([file] * len(uids), pa.string())}))
        grouped = pa.concat_tables(pieces).group_by("uid", use_threads=False).aggregate([("file", "min")])
        index = pa.table({"uid": grouped.column("uid"), "file": grouped.column("file_min")})
        pooled = {}
        for item in items:
            uids = latent_reuse.shard_uids(item["source"])
            if uids is not None and len(uids):
                rows = pa.table({"uid": uids}).join(index, "uid", join_type="inner")
                if rows.num_rows:
                    pooled[item["name"]] = rows
        log.info("dedup_images: hashes of %d samples reused from earlier de-dups", sum(t.num_rows for t in pooled.values()))
        return key, pooled

    def _report(self, ctx: Context, removed: pa.Table, n: int, shards: list[str], position: dict,
                sources: list[str]) -> dict:
        """Counts by kind and a grid of sampled pairs (duplicate, then the kept one) for a human to judge."""
        wanted = removed.slice(0, ctx.cfg.report_pairs).to_pylist()
        need = {r["uid"] for r in wanted} | {r["duplicate_of"] for r in wanted}
        need_shards = {shards[position[u]] for u in need}
        images: dict[str, bytes] = {}
        for source in sources:
            if need <= set(images):
                break
            if image_shards.source_name(source) not in need_shards:
                continue
            for _, parts in image_shards.iter_shard_samples(source):
                meta = json.loads(parts.get("json", b"{}"))
                ext = next((e for e in image_shards.IMAGE_EXTENSIONS if e in parts), None)
                if ext and meta.get("uid") in need:
                    images[meta["uid"]] = parts[ext]
        thumbs = [(images[u], f"{r['kind']} {u[:8]}" if u == r["uid"] else f"kept {u[:8]}")
                  for r in wanted for u in (r["uid"], r["duplicate_of"]) if u in images]
        kinds = {k: removed.column("kind").to_pylist().count(k) for k in ("exact", "near")}
        samples = {"duplicate_of": [{"uid": r["uid"], "duplicate_of": r["duplicate_of"], "kind": r["kind"]}
                                    for r in wanted]}
        return reports.counts_report(ctx.output, "dedup_images", ctx.version, kinds,
                                     kept=n - removed.num_rows, samples=samples, thumbnails=thumbs)


def check_exclude(uri: str, input_uri: str) -> dict:
    """The manifest of a finished dedup_images output of `input_uri` (what precompute's `exclude` names)."""
    uri = storage.normalize(uri)
    if not manifest_lib.has_manifest(uri) or manifest_lib.read(uri).get("phase") != "dedup_images":
        raise ConfigError(f"exclude: {uri} is not a finished dedup_images output")
    found = manifest_lib.read(uri)
    of = (found.get("input") or {}).get("uri")
    if of and storage.basename(of) != storage.basename(input_uri):
        raise ConfigError(f"exclude: {uri} de-duplicates {of}, not this input {input_uri}")
    return found


def excluded_uids(uri: str, shard: Optional[str] = None) -> dict[str, str]:
    """uid -> the uid it duplicates, from a finished dedup_images output (what precompute leaves out); with
    `shard` (an image shard's name, e.g. 00003) only that shard's."""
    import pyarrow.compute as pc

    with storage.open_input(storage.join(storage.normalize(uri), DUPLICATES)) as handle:
        table = pq.read_table(handle, columns=["uid", "duplicate_of", "shard"])
    if shard is not None:
        table = table.filter(pc.equal(table.column("shard"), shard))
    return dict(zip(table.column("uid").to_pylist(), table.column("duplicate_of").to_pylist()))


PHASE = DedupImagesPhase()
run, main, output_dir = PHASE.run, PHASE.main, PHASE.output_dir


if __name__ == "__main__":
    module_cli(__spec__.name)
