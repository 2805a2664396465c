"""Multi-aspect buckets (issue 18): which bucket an image goes to, the precompute config's checks, and the
bucketed reader's contract (every batch one bucket, a deterministic schedule, exact resume, loader workers,
ranks). The phase end to end: test_precompute_buckets in this file (Ray); training and generation at
bucket sizes: tests/test_buckets_e2e.py (slow_e2e)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipelines import config as config_lib
from pipelines import latent_shards as ld
from pipelines import precompute
from pipelines.config import ConfigError
from pipelines.latent_buckets import BucketedLatentReader, assign_buckets, open_reader
from pipelines.latent_shards import LatentDatasetError
from pipelines.training import data as training_data
from pipelines.training.config import DataConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (stage_a shape, rows per shard)
BUCKETS = {"32x32": ((4, 8, 8), (21, 16)), "16x48": ((4, 4, 12), (9, 14)), "48x16": ((4, 12, 4), (5, 2))}
ROW_GROUP = 4


def test_images_go_to_the_bucket_nearest_their_aspect_ratio():
    sizes = [[32, 32], [16, 48], [48, 16]]
    widths, heights = [100, 300, 100, 140, 100, 173, 50, 180], [100, 100, 300, 100, 141, 100, 100, 100]
    assert assign_buckets(widths, heights, sizes).tolist() == [0, 1, 2, 0, 0, 0, 2, 1]
    # Equally far in log space from 1:1 and 3:1 (sqrt 3): the earlier bucket.
    assert assign_buckets([3 ** 0.5], [1.0], sizes).tolist() == [0]


def _precompute_config(*overrides: str) -> precompute.PrecomputeConfig:
    return config_lib.load(precompute.PrecomputeConfig, os.path.join(REPO_ROOT, "configs", "precompute-tiny.yaml"),
                           ["input=/nowhere", "encoders.text=/t", "encoders.semantic=/s", "encoders.stage_a=/a",
                            *overrides])


def test_bucket_config_errors_name_the_key():
    cfg = _precompute_config("buckets=[[32,32],[16,48],[48,16]]")
    assert [b["name"] for b in cfg.bucket_sizes()] == ["32x32", "16x48", "48x16"]
    # semantic 64 px for Stage A 32 px: a 16x48 Stage A input has a 32x96 semantic input, 1x3 latents.
    assert cfg.bucket_sizes()[1] == {"name": "16x48", "stage_a": [16, 48], "semantic": [32, 96], "decode": [32, 96]}
    cases = {"buckets=[[32,32],[32,32]]": "buckets[1]: [32, 32] is listed twice",
             "buckets=[[32,30]]": "buckets[0]: width 30 is not a multiple of 4",
             "buckets=[[32,36]]": "buckets[0]: width 36 x semantic_resolution",
             "buckets=[[16,16]]": "buckets[0]: 16x16 = 256 pixels, not within 25%",
             "buckets=[]": "buckets: list at least one",
             "buckets=[[32]]": "buckets[0]: expected [height, width]"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _precompute_config(override)
    with pytest.raises(ConfigError, match="buckets: need an image output"):
        _precompute_config("buckets=[[32,32]]", "outputs=[text]")


# ------------------------------------------------------------------------------------------------
# The reader over a hand-written bucketed dataset


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory) -> str:
    """Three buckets of different shapes over two shards; stage_a[0, 0, 0] holds the sample's index."""
    root = str(tmp_path_factory.mktemp("bucketed") / "v1")
    entries, index = [], 0
    for name, (shape, rows_per_shard) in BUCKETS.items():
        shapes = {"text_emb": [2, 3], "stage_a": list(shape)}
        shards = []
        for shard, rows in enumerate(rows_per_shard):
            uids = [f"{name}/{index + i}" for i in range(rows)]
            stage_a = np.zeros((rows, *shape), dtype=np.float16)
            stage_a[:, 0, 0, 0] = np.arange(index, index + rows)
            text = np.zeros((rows, 2, 3), dtype=np.float16)
            table = ld.shard_table([u.replace("/", "-") for u in uids], uids, ["c"] * rows,
                                   {"text_emb": text.tobytes(), "stage_a": stage_a.tobytes()}, shapes)
            file = f"{name}/shard-{shard:05d}.parquet"
            ld.write_shard(os.path.join(root, file), [table], shapes, ROW_GROUP, {"written": rows})
            shards.append({"file": file, "rows": rows})
            index += rows
        entries.append({"name": name, "size": [int(s) for s in name.split("x")],
                        "columns": {k: ld.column_spec(k, v) for k, v in shapes.items()},
                        "samples": sum(rows_per_shard), "shards": shards, "validation": {"samples": 0, "shards": []}})
    manifest = {"phase": "precompute", "row_group_size": ROW_GROUP, "buckets": entries,
                "columns": {"text_emb": {"dtype": "float16"}, "stage_a": {"dtype": "float16"}},
                "validation": {"fraction": 0.0, "samples": 0}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def _bucket(uid: str) -> str:
    return uid.split("/")[0]


def _reader(root: str, **kwargs) -> BucketedLatentReader:
    args = dict(seed=5, batch_size=4, shuffle_window=8, infinite=True)
    args.update(kwargs)
    return open_reader(root, ["uid", "stage_a"], **args)


def _take(stream, n: int) -> list[list[str]]:
    return [list(next(stream)["uid"]) for _ in range(n)]


def test_every_batch_is_one_bucket_with_that_buckets_shape(bucketed):
    reader = _reader(bucketed)
    assert isinstance(reader, BucketedLatentReader)
    stream = iter(reader)
    seen = set()
    for _ in range(40):
        batch = next(stream)
        (name,) = {_bucket(u) for u in batch["uid"]}
        seen.add(name)
        assert tuple(batch["stage_a"].shape[1:]) == BUCKETS[name][0] and len(batch["uid"]) == 4
        # The tensor is the uid's row.
        assert [int(v) for v in batch["stage_a"][:, 0, 0, 0]] == [int(u.split("/")[1]) for u in batch["uid"]]
    assert seen == set(BUCKETS)


def test_the_schedule_follows_the_buckets_sizes_per_cycle(bucketed):
    reader = _reader(bucketed)
    # rows 37, 23, 7 -> batches of 4 per cycle: round(37/4)=9, round(23/4)=6, round(7/4)=2.
    assert reader.cycle_counts.tolist() == [9, 6, 2]
    stream = iter(reader)
    buckets = [_bucket(next(stream)["uid"][0]) for _ in range(17 * 3)]
    for cycle in range(3):
        names = buckets[17 * cycle:17 * (cycle + 1)]
        assert [names.count(n) for n in BUCKETS] == [9, 6, 2]
    assert buckets[:17] != buckets[17:34]  # each cycle has its own order


def test_order_is_a_function_of_the_seed(bucketed):
    assert _take(iter(_reader(bucketed)), 30) == _take(iter(_reader(bucketed)), 30)
    assert _take(iter(_reader(bucketed)), 30) != _take(iter(_reader(bucketed, seed=6)), 30)


@pytest.mark.parametrize("batches", [1, 7, 17, 40])
def test_resume_at_a_batch_equals_the_uninterrupted_stream(bucketed, batches):
    whole = _take(iter(_reader(bucketed)), batches + 25)
    resumed = _take(iter(_reader(bucketed, start_offset=4 * batches)), 25)
    assert resumed == whole[batches:]


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_workers_give_the_same_stream_and_resume(bucketed, workers):
    whole = _take(iter(_reader(bucketed)), 45)
    config = DataConfig(loader_workers=workers, seed=0)
    stream = training_data.batches(_reader(bucketed), config, torch.device("cpu"))
    assert _take(stream, 45) == whole
    stream = training_data.batches(_reader(bucketed, start_offset=4 * 13), config, torch.device("cpu"))
    assert _take(stream, 20) == whole[13:33]


def test_each_row_group_is_read_once_per_bucket_pass(bucketed):
    reader = _reader(bucketed, shuffle_window=64)
    pieces = list(zip(range(200), reader._piece_plan()))
    blocks = [(bucket, piece.epoch, piece.block) for _, (bucket, piece) in pieces]
    assert len(blocks) == len(set(blocks))  # world size 1, window >= epoch: every block once per epoch


def test_ranks_share_the_schedule_and_split_each_bucket(bucketed):
    ranks = [_reader(bucketed, rank=r, world_size=2, shuffle_window=64) for r in range(2)]
    streams = [iter(r) for r in ranks]
    taken = [_take(s, 17) for s in streams]  # one cycle
    # Same bucket at every step on both ranks.
    assert [_bucket(b[0]) for b in taken[0]] == [_bucket(b[0]) for b in taken[1]]
    per_bucket = ranks[0].samples_per_bucket  # 18, 11, 3 per rank and epoch
    for b, name in enumerate(BUCKETS):
        firsts = [[u for batch in t if _bucket(batch[0]) == name for u in batch][:per_bucket[b]] for t in taken]
        assert not set(firsts[0]) & set(firsts[1])


def test_a_bucket_smaller_than_the_world_is_left_out(bucketed):
    reader = _reader(bucketed, world_size=8, rank=3)
    assert reader.skipped_buckets == {"48x16": 7} and reader.bucket_names == ["32x32", "16x48"]
    with pytest.raises(LatentDatasetError, match="no bucket of the train split holds 40 samples"):
        _reader(bucketed, world_size=40, rank=0)


def test_epoch_mode_reads_bucket_after_bucket_and_resumes(bucketed):
    reader = _reader(bucketed, infinite=False, shuffle=False, batch_size=5)
    batches = [list(b["uid"]) for b in reader]
    flat = [u for b in batches for u in b]
    assert [len(b) for b in batches] == [5] * 7 + [2] + [5] * 4 + [3] + [5, 2]
    assert flat == [f"{n}/{i}" for n, i in zip([n for n in BUCKETS for _ in range(sum(BUCKETS[n][1]))], range(67))]
    resumed = [u for b in _reader(bucketed, infinite=False, shuffle=False, batch_size=5, start_offset=40)
               for u in b["uid"]]
    assert resumed == flat[40:]
    samples = list(_reader(bucketed, infinite=False, shuffle=False, batch_size=None))
    assert [s["uid"] for s in samples] == flat


def test_bad_requests_name_the_problem(bucketed):
    with pytest.raises(LatentDatasetError, match="pass batch_size"):
        _reader(bucketed, batch_size=None)
    with pytest.raises(LatentDatasetError, match="batch boundary"):
        _reader(bucketed, start_offset=6)
    with pytest.raises(LatentDatasetError, match="has aspect-ratio buckets"):
        ld.LatentDataset(bucketed, ["uid"], batch_size=4)
    with pytest.raises(LatentDatasetError, match="bucket 'nope'"):
        ld.LatentDataset(bucketed, ["uid"], batch_size=4, bucket="nope")
    # One bucket alone is an ordinary dataset.
    one = ld.LatentDataset(bucketed, ["uid", "stage_a"], batch_size=4, bucket="16x48", infinite=False, shuffle=False)
    assert sum(len(b["uid"]) for b in one) == 23
    assert ld.split_samples(json.load(open(os.path.join(bucketed, "manifest.json"))), "train") == 67


# ------------------------------------------------------------------------------------------------
# The phase: precompute into buckets (real Ray, tiny encoders)


def _write_images(root: str, rng: np.random.Generator) -> dict[str, str]:
    """Two img2dataset-like shards of square, wide (3:1) and tall (1:3) images and one corrupt file;
    returns uid -> the bucket its aspect ratio belongs in."""
    import io
    import tarfile

    from PIL import Image

    os.makedirs(root)
    expected = {}
    sizes = {"32x32": (60, 60), "16x48": (150, 50), "48x16": (40, 120)}  # PIL (width, height)
    for shard in range(2):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for i in range(9):
                key = f"{shard:05d}{i:04d}"
                bucket = list(sizes)[(i + shard) % 3]
                if shard == 1 and i == 8:
                    data, bucket = b"not an image", None
                else:
                    buffer = io.BytesIO()
                    pixels = rng.integers(0, 256, size=(*sizes[bucket][::-1], 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    data = buffer.getvalue()
                for name, payload in ((f"{key}.png", data), (f"{key}.txt", b"a caption"),
                                      (f"{key}.json", json.dumps({"uid": f"uid-{key}", "caption": f"c {key}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
                if bucket:
                    expected[f"uid-{key}"] = bucket
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"phase": "download", "counts": {"succeeded": 18}}, f)
    return expected


@pytest.mark.e2e
def test_precompute_buckets_end_to_end_and_resume(tmp_path, embedded_ray):
    import stages
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    expected = _write_images(str(tmp_path / "images"), np.random.default_rng(0))
    for name, model in (("text", TextEncoder(TextEncoderConfig.tiny())),
                        ("semantic", SemanticCompressor(SemanticCompressorConfig.tiny())),
                        ("stage_a", StageA(StageAConfig.tiny()))):
        stages.save(model, tmp_path / "ckpt" / name)
    overrides = [f"input={tmp_path / 'images'}", f"output={tmp_path / 'latents'}", f"data_root={tmp_path}",
                 *(f"encoders.{k}={tmp_path / 'ckpt' / k}" for k in ("text", "semantic", "stage_a")),
                 "outputs=[text,semantic,stage_a,semantic_image]", "buckets=[[32,32],[16,48],[48,16]]",
                 "validation_fraction=0.2", "mlflow.enabled=false"]
    argv = ["--config", os.path.join(REPO_ROOT, "configs", "precompute-tiny.yaml"),
            *[a for o in overrides for a in ("--set", o)]]
    plain = config_lib.load(precompute.PrecomputeConfig, argv[1], [o for o in overrides if not o.startswith("buckets")])
    assert "buckets" not in precompute.version_tree(plain)  # older datasets keep their versions
    result = precompute.main(argv)
    manifest, out = result.manifest, result.output
    counts = manifest["counts"]
    assert counts["input_samples"] == 18 and counts["skipped_by_reason"] == {"decode_error": 1}
    assert counts["written"] == 17 == counts["train"] + counts["validation"]
    assert sum(counts["train_by_bucket"].values()) == counts["train"]
    buckets = {b["name"]: b for b in manifest["buckets"]}
    assert list(buckets) == ["32x32", "16x48", "48x16"]
    # Shapes per bucket: Stage A / 4, the semantic input scaled by 64 / 32, its latent / 32.
    assert buckets["16x48"]["columns"]["stage_a"]["shape"] == [4, 4, 12]
    assert buckets["16x48"]["columns"]["semantic"]["shape"] == [16, 1, 3]
    assert buckets["48x16"]["columns"]["semantic_image"]["shape"] == [3, 96, 32]
    assert buckets["32x32"]["columns"]["stage_a"]["shape"] == [4, 8, 8]
    assert "shape" not in manifest["columns"]["stage_a"] and "shards" not in manifest

    # Every sample is in the bucket of its aspect ratio, in one split, with its bucket's shapes.
    found = {}
    for name, entry in buckets.items():
        for split in ("train", "validation"):
            if not ld.split_samples(ld.bucket_manifest(manifest, name), split):
                continue
            reader = ld.LatentDataset(out, ["uid", "stage_a", "semantic", "semantic_image"], bucket=name, split=split,
                                      shuffle=False, infinite=False, batch_size=64)
            for batch in reader:
                assert tuple(batch["stage_a"].shape[1:]) == tuple(entry["columns"]["stage_a"]["shape"])
                assert tuple(batch["semantic_image"].shape[1:]) == tuple(entry["columns"]["semantic_image"]["shape"])
                for uid in batch["uid"]:
                    assert uid not in found
                    found[uid] = name
    assert found == expected
    assert manifest["validation"]["samples"] == counts["validation"] > 0

    # Resume: a shard whose counts file is gone is computed again, alone, to the same bytes.
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("32x32/shard-00001.parquet",)}
    os.remove(os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, "shards", "shard-00001.json"))
    again = precompute.main(argv)
    assert again.manifest["last_run"]["shards_computed"] == 1
    assert again.manifest["counts"] == counts and again.manifest["buckets"] == manifest["buckets"]
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before

    # Another download version holding the same samples (a re-filter): every latent is copied into the bucket
    # and split it was written to, none encoded; the corrupt image, in no earlier version, is decoded and skipped.
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "images2")
    for shard in range(2):
        shutil.copy(tmp_path / "images" / f"{shard:05d}.tar", tmp_path / "images2" / f"{shard:05d}.tar")
        uids = [f"uid-{shard:05d}{i:04d}" for i in range(9)]
        pq.write_table(pa.table({"uid": uids, "status": ["success"] * 9}), tmp_path / "images2" / f"{shard:05d}.parquet")
    with open(tmp_path / "images2" / "manifest.json", "w") as f:
        json.dump({"phase": "download", "counts": {"succeeded": 18}, "filter_version": "looser"}, f)
    argv2 = [a.replace(str(tmp_path / "images"), str(tmp_path / "images2")) for a in argv]
    copied = precompute.main(argv2)
    assert copied.version != result.version and copied.manifest["reuse_pool"] == [result.version]
    c2 = copied.manifest["counts"]
    assert c2["reused"] == 17 and c2["encoded"] == 0 and c2["skipped_by_reason"] == {"decode_error": 1}
    assert {k: v for k, v in c2.items() if k not in ("reused", "encoded")} == \
        {k: v for k, v in counts.items() if k not in ("reused", "encoded")}
    for name, entry in buckets.items():
        for split, files in (("train", entry["shards"]), ("validation", entry["validation"]["shards"])):
            for e in files:
                assert pq.read_table(os.path.join(copied.output, e["file"])).replace_schema_metadata(None).equals(
                    pq.read_table(os.path.join(out, e["file"])).replace_schema_metadata(None)), e["file"]

    # Training reads it through one reader: every batch one bucket.
    stream = iter(open_reader(out, ["uid", "stage_a"], batch_size=3, seed=0, shuffle_window=8))
    for _ in range(12):
        batch = next(stream)
        assert len({found[u] for u in batch["uid"]}) == 1
