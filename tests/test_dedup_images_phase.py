"""The dedup_images phase end to end (issue 20): a download-like output with planted copies of images
(re-encoded as JPEG, resized, under other uids and URLs) next to the demo's look-alike drawings; the copies are
removed as duplicate_of the kept sample, the look-alikes kept, the counts add up, the report shows pairs."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import dedup_images
from pipelines import demo_data

pytestmark = pytest.mark.e2e


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_planted_copies_are_removed_and_look_alikes_kept(embedded_ray, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images" / "v1"
    os.makedirs(root)
    originals = []
    combos = [(c, s, p) for c in list(demo_data.COLOURS)[:4] for s in demo_data.SHAPES[:3]
              for p in list(demo_data.POSITIONS)[:2]]
    for i, (colour, shape, position) in enumerate(combos):
        originals.append((f"orig-{i:03d}", demo_data.draw(shape, colour, "white", position, "large", 128, rng),
                          5.0 + (i % 3)))
    planted = {}  # copy uid -> original uid
    samples = [(uid, _jpeg(image), score) for uid, image, score in originals]
    for i in (0, 5, 9):
        uid, image, score = originals[i]
        samples.append((f"copy-q60-{i}", _jpeg(image, 60), score - 1))  # re-encoded, lower score
        samples.append((f"copy-half-{i}", _jpeg(image.resize((64, 64), Image.BICUBIC)), score - 2))  # resized
        planted[f"copy-q60-{i}"] = planted[f"copy-half-{i}"] = uid
    samples.append(("exact-0", samples[3][1], 1.0))  # the same bytes under another uid
    planted["exact-0"] = samples[3][0]
    order = rng.permutation(len(samples))
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for k in order[shard::2]:
                uid, data, score = samples[k]
                key = f"{shard:05d}{k:04d}"
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.json", json.dumps({"uid": uid, "caption": "c", "aesthetic": score,
                                                     "url": f"http://127.0.0.1/{uid}.jpg"}).encode())
    with open(root / "manifest.json", "w") as f:
        json.dump({"phase": "download", "counts": {"samples": len(samples)}, "reuse_key": "same-settings"}, f)

    result = dedup_images.main(["--input", str(root), "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false",
                                "--set", "num_buckets=3"])
    counts = result.manifest["counts"]
    assert counts["samples"] == len(samples) and counts["kept"] + counts["duplicates"] == len(samples)
    duplicates = pq.read_table(os.path.join(result.output, dedup_images.DUPLICATES)).to_pylist()
    assert {d["uid"]: d["duplicate_of"] for d in duplicates} == planted
    assert {d["uid"]: d["kind"] for d in duplicates}["exact-0"] == "exact"
    assert counts["exact_duplicates"] == 1 and counts["near_duplicates"] == 6
    assert os.path.getsize(os.path.join(result.output, "report", "thumbnails.png")) > 1000
    assert dedup_images.excluded_uids(result.output) == planted
    by_shard = [dedup_images.excluded_uids(result.output, f"{shard:05d}") for shard in range(2)]
    assert {**by_shard[0], **by_shard[1]} == planted and all(by_shard)

    # A download of another filter version with the same sample settings: every hash is copied (no image decoded),
    # the same copies found.
    import shutil

    import pyarrow as pa

    v2 = tmp_path / "images" / "v2-same-settings"
    os.makedirs(v2)
    for shard in range(2):
        shutil.copy(root / f"{shard:05d}.tar", v2 / f"{shard:05d}.tar")
        with tarfile.open(root / f"{shard:05d}.tar") as tar:
            uids = [json.load(tar.extractfile(m))["uid"] for m in tar.getmembers() if m.name.endswith(".json")]
        pq.write_table(pa.table({"uid": uids, "status": ["success"] * len(uids)}), v2 / f"{shard:05d}.parquet")
    with open(v2 / "manifest.json", "w") as f:
        json.dump({"phase": "download", "counts": {"samples": len(samples)}, "reuse_key": "same-settings",
                   "filter": "v2"}, f)
    again = dedup_images.main(["--input", str(v2), "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false"])
    assert again.version != result.version
    assert again.manifest["counts"]["reused_hashes"] == len(samples) and result.manifest["counts"]["reused_hashes"] == 0
    assert dedup_images.excluded_uids(again.output) == planted

    # precompute with exclude: the copies are left out (counted, before decoding), the rest written once each.
    import torch

    import stages
    from pipelines import config as config_lib, precompute
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    torch.manual_seed(0)
    stages.save(TextEncoder(TextEncoderConfig.tiny()), tmp_path / "ckpt" / "text")
    stages.save(StageA(StageAConfig.tiny()), tmp_path / "ckpt" / "stage_a")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [f"input={root}", f"encoders.text={tmp_path / 'ckpt' / 'text'}",
                 f"encoders.stage_a={tmp_path / 'ckpt' / 'stage_a'}", "outputs=[text, stage_a]",
                 "validation_fraction=0", f"data_root={tmp_path}", "mlflow.enabled=false"]
    cfg = config_lib.load(precompute.PrecomputeConfig, os.path.join(repo, "configs", "precompute-tiny.yaml"),
                          overrides + [f"exclude={result.output}"])
    latents = precompute.run(cfg)
    counts = latents.manifest["counts"]
    assert counts["input_samples"] == len(samples) and counts["written"] == len(samples) - len(planted)
    assert counts["skipped_by_reason"] == {"duplicate_image": len(planted)}
    written = {u for e in latents.manifest["shards"]
               for u in pq.read_table(os.path.join(latents.output, e["file"]), columns=["uid"]).column("uid").to_pylist()}
    assert written == {uid for uid, _, _ in samples} - set(planted)
    plain = config_lib.load(precompute.PrecomputeConfig, os.path.join(repo, "configs", "precompute-tiny.yaml"), overrides)
    assert "exclude_version" not in precompute.version_tree(plain)  # versions written before `exclude` keep theirs
    assert precompute.version_tree(cfg)["exclude_version"] == result.version

    other = tmp_path / "images" / "v2"
    os.makedirs(other)
    with open(other / "manifest.json", "w") as f:
        json.dump({"phase": "download", "counts": {"samples": 0}}, f)
    with pytest.raises(config_lib.ConfigError, match="exclude: .* not this input"):
        precompute.run(config_lib.load(precompute.PrecomputeConfig, os.path.join(repo, "configs", "precompute-tiny.yaml"),
                                       [f"input={other}", *overrides[1:], f"exclude={result.output}"]))
