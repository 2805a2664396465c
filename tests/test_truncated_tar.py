"""A truncated image shard keeps the samples before the break and counts the rest, in the tar reader that
precompute uses (`iter_tar_samples`), in precompute's decode step, and in the Stage A reader."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from pipelines import image_shards

import helpers

PER_SHARD = 16


@pytest.fixture
def shards(tmp_path):
    return helpers.write_image_shards(str(tmp_path / "images" / "v1"), shards=2, per_shard=PER_SHARD)


def member_ends(tar_path: str) -> list[tuple[str, int]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, m.offset_data + m.size) for m in tar.getmembers()]


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def split_samples(samples):
    real = [(k, p) for k, p in samples if image_shards.truncated_detail(p) is None]
    lost = [(k, p) for k, p in samples if image_shards.truncated_detail(p) is not None]
    return real, lost


def test_a_tar_cut_inside_a_member_keeps_what_came_before_and_counts_the_rest(shards):
    tar = os.path.join(shards, "00000.tar")
    ends = member_ends(tar)
    # Cut in the middle of the 6th sample's image (members: jpg, txt, json per sample).
    name, end = ends[5 * 3]
    truncate(tar, end - 100)
    real, lost = split_samples(list(image_shards.iter_tar_samples(tar)))
    assert len(real) + len(lost) == PER_SHARD  # every sample of the shard is accounted for
    assert [k for k, _ in real[:5]] == [f"00000{i:04d}" for i in range(5)]
    assert all(set(p) == {"jpg", "txt", "json"} for _, p in real[:5])  # complete samples intact
    assert len(lost) == PER_SHARD - len(real) >= PER_SHARD - 6
    detail = image_shards.truncated_detail(lost[0][1])
    assert detail.startswith("truncated_tar: ") and "00000.tar" in detail and f"of its {PER_SHARD} samples" in detail


def test_a_tar_cut_at_a_member_boundary_is_caught_by_the_recorded_count(shards):
    tar = os.path.join(shards, "00001.tar")
    name, end = member_ends(tar)[4 * 3 - 1]  # right after the 4th sample's last member
    truncate(tar, -(-end // 512) * 512)  # tarfile sees a clean end of data here: no error at all
    real, lost = split_samples(list(image_shards.iter_tar_samples(tar)))
    assert len(real) == 4 and len(lost) == PER_SHARD - 4
    # An explicit expectation wins; with none known, a silent early end cannot be detected, and is not invented.
    assert len(list(image_shards.iter_tar_samples(tar, expected=6))) == 6


def test_an_unreadable_tar_of_unknown_size_counts_at_least_one(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x00\x01not a tar at all" * 40)
    samples = list(image_shards.iter_tar_samples(str(path)))
    assert len(samples) == 1 and "an unknown number of samples lost" in image_shards.truncated_detail(samples[0][1])


def test_precompute_decoding_does_not_fail_on_a_truncated_shard(shards):
    from pipelines import precompute_cpu

    tar = os.path.join(shards, "00000.tar")
    truncate(tar, member_ends(tar)[7 * 3 + 1][1] - 10)  # inside the 8th sample's .txt
    rows = list(precompute_cpu.decode_shard({"shard": np.array(["00000"]), "tar": np.array([tar])},
                                            chunk_size=5, size=32, max_image_pixels=10**7))
    metas = [json.loads(r["meta"][0]) for r in rows]
    assert sum(m["input_samples"] for m in metas) == PER_SHARD  # nothing lost from the accounting
    decoded = sum(len(m["uids"]) for m in metas)
    skipped = [s for m in metas for s in m["skipped"]]
    # Seven samples before the break decode; the cut one (its jpg read whole, its .txt cut, no .json) is a
    # missing_json skip and the placeholders of the lost ones are truncated_tar skips.
    assert decoded == 7 and len(skipped) == PER_SHARD - 7
    lost = [s for s in skipped if "/lost-" in s[0]]
    assert len(lost) == PER_SHARD - 8 and {s[2] for s in lost} == {"truncated_tar"}
    assert {s[2] for s in skipped if "/lost-" not in s[0]} == {"missing_json"}


def test_the_stage_a_reader_reads_a_truncated_shard(shards):
    tar = os.path.join(shards, "00000.tar")
    truncate(tar, member_ends(tar)[10 * 3][1] - 50)
    reader = image_shards.ImageShardReader(shards, batch_size=8, image_size=32, crop_size=16, shuffle_window=32)
    seen = set()
    for epoch, position, shard, index in reader.positions(0, reader.samples_per_epoch):
        image, key = reader.load(epoch, position, shard, index)
        assert image.shape == (3, 16, 16) and np.isfinite(image).all()
        seen.add(key)
    # The lost images' positions reuse the readable ones: only those keys appear, each shard's stream intact.
    assert {k for k in seen if k.startswith("00000")} == {f"00000{i:04d}" for i in range(10)}
    assert len({k for k in seen if k.startswith("00001")}) == PER_SHARD
