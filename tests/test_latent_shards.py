"""The latent-dataset reader's contract: coverage, determinism, exact resume, column selection."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines import latent_shards as ld
from pipelines.latent_shards import LatentDataset, LatentDatasetError

SHARD_ROWS = [10, 7, 13, 1]  # uneven on purpose: short last blocks, a one-row shard
ROW_GROUP = 4
SHAPES = {"text_emb": (3, 2), "semantic": (2, 2, 2)}
N = sum(SHARD_ROWS)


def _uid(shard: int, row: int) -> str:
    return f"s{shard}-r{row}"


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> str:
    """A latent dataset in the precompute format whose tensors encode each sample's global index."""
    root = str(tmp_path_factory.mktemp("latents") / "v1")
    os.makedirs(root)
    schema = ld.shard_schema(SHAPES)
    shards, first = [], 0
    for shard, rows in enumerate(SHARD_ROWS):
        index = np.arange(first, first + rows)
        table = pa.table({
            "key": [f"{shard:05d}{r:04d}" for r in range(rows)],
            "uid": [_uid(shard, r) for r in range(rows)],
            "caption": [f"caption {shard} {r}" for r in range(rows)],
            "text_emb": ld.tensor_column(np.broadcast_to(index[:, None, None], (rows, *SHAPES["text_emb"]))),
            "semantic": ld.tensor_column(-np.broadcast_to(index[:, None, None, None], (rows, *SHAPES["semantic"]))),
        }, schema=schema)
        name = f"shard-{shard:05d}.parquet"
        with pq.ParquetWriter(os.path.join(root, name), schema, **ld.parquet_writer_options(schema)) as writer:
            writer.write_table(table, row_group_size=ROW_GROUP)
        shards.append({"file": name, "rows": rows})
        first += rows
    manifest = {"phase": "precompute", "shards": shards, "row_group_size": ROW_GROUP,
                "columns": {k: {"shape": list(v), "dtype": "float16"} for k, v in SHAPES.items()}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def _uids(items, batched: bool) -> list[str]:
    out: list[str] = []
    for item in items:
        out += item["uid"] if batched else [item["uid"]]
    return out


def _epoch_uids(ds: LatentDataset, epoch: int) -> list[str]:
    return [_uid(s, r) for s, r in ds.epoch_order(epoch)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_and_workers_cover_the_epoch_disjointly(latents, world_size):
    seen: list[str] = []
    for rank in range(world_size):
        ds = LatentDataset(latents, ["uid"], rank=rank, world_size=world_size, seed=7, infinite=False,
                           batch_size=3, shuffle_window=5)
        # Two worker processes hand back batches round-robin: the consumer sees the rank's stream.
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        rank_uids = _uids(loader, batched=True)
        assert rank_uids == _epoch_uids(ds, 0)
        assert len(rank_uids) == N // world_size
        seen += rank_uids
    assert len(seen) == len(set(seen)), "a sample was given to two ranks in one epoch"
    everything = {_uid(s, r) for s, n in enumerate(SHARD_ROWS) for r in range(n)}
    assert set(seen) <= everything
    assert len(everything - set(seen)) == N % world_size  # only the < world_size remainder is left out


def test_single_sample_mode_with_workers_is_disjoint_and_complete(latents):
    ds = LatentDataset(latents, ["uid"], seed=1, infinite=False)
    uids = _uids(DataLoader(ds, batch_size=None, num_workers=2), batched=False)
    assert sorted(uids) == sorted(_epoch_uids(ds, 0)) and len(set(uids)) == N


def test_order_is_a_function_of_seed_and_epoch(latents):
    def first_epoch(seed: int, epoch: int = 0) -> list[str]:
        ds = LatentDataset(latents, ["uid"], seed=seed, epoch=epoch, infinite=False, batch_size=4)
        return _uids(ds, batched=True)

    assert first_epoch(3) == first_epoch(3)
    assert sorted(first_epoch(3)) == sorted(first_epoch(4))
    assert first_epoch(3) != first_epoch(4)
    assert first_epoch(3, epoch=0) != first_epoch(3, epoch=1)
    unshuffled = LatentDataset(latents, ["uid"], shuffle=False, infinite=False)
    assert _uids(unshuffled, batched=False) == [_uid(s, r) for s, n in enumerate(SHARD_ROWS) for r in range(n)]


@pytest.mark.parametrize("offset", [0, 5, 16, 31, 47])
def test_resume_at_offset_equals_uninterrupted(latents, offset):
    """k samples consumed, then restarted with start_offset=k: the same samples follow, across epoch
    boundaries (infinite mode: 15 samples per rank per epoch), with batches and workers."""
    kwargs = dict(world_size=2, rank=1, seed=11, batch_size=4, shuffle_window=6)
    uninterrupted = LatentDataset(latents, ["uid"], **kwargs)
    stream = _uids(itertools.islice(uninterrupted, 30), batched=True)
    resumed = LatentDataset(latents, ["uid"], start_offset=offset, **kwargs)
    loader = DataLoader(resumed, batch_size=None, num_workers=2)
    after = _uids(itertools.islice(iter(loader), 5), batched=True)
    assert after == stream[offset:offset + 20]
    # Infinite mode walks through the epochs in order: the stream is S(r, 0) + S(r, 1) + ...
    per_epoch = uninterrupted.samples_per_epoch
    assert per_epoch == N // 2
    expected = list(itertools.chain.from_iterable(_epoch_uids(uninterrupted, e) for e in range(10)))
    assert stream == expected[:len(stream)]


def test_epoch_mode_resume_and_drop_last(latents):
    full = LatentDataset(latents, ["uid"], seed=2, infinite=False, batch_size=4)
    order = _uids(full, batched=True)
    assert len(order) == N
    resumed = LatentDataset(latents, ["uid"], seed=2, infinite=False, batch_size=4, start_offset=9)
    batches = list(resumed)
    assert _uids(batches, batched=True) == order[9:]
    assert [len(b["uid"]) for b in batches] == [4, 4, 4, 4, 4, 2]
    dropped = LatentDataset(latents, ["uid"], seed=2, infinite=False, batch_size=4, start_offset=9, drop_last=True)
    assert [len(b["uid"]) for b in dropped] == [4, 4, 4, 4, 4]


def test_columns_shapes_values_and_only_requested_columns_read(latents, monkeypatch):
    requested: list[list[str]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        requested.append(list(columns))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    ds = LatentDataset(latents, ["uid", "text_emb"], seed=5, infinite=False, batch_size=6)
    batches = list(ds)
    assert requested and all(cols == ["uid", "text_emb"] for cols in requested)
    first = batches[0]
    assert set(first) == {"uid", "text_emb"}
    assert first["text_emb"].dtype == torch.float16 and first["text_emb"].shape == (6, 3, 2)
    offsets = np.cumsum([0] + SHARD_ROWS)
    for batch in batches:
        for uid, tensor in zip(batch["uid"], batch["text_emb"]):
            shard, row = (int(p[1:]) for p in uid.split("-"))
            assert torch.all(tensor == float(offsets[shard] + row))
    single = next(iter(LatentDataset(latents, ["semantic", "caption"], shuffle=False)))
    assert single["semantic"].shape == (2, 2, 2) and torch.all(single["semantic"] == 0.0)
    assert single["caption"] == "caption 0 0"


def test_bad_requests_name_the_problem(latents, tmp_path):
    with pytest.raises(LatentDatasetError, match="stage_a.*available: uid, caption, key, semantic, text_emb"):
        LatentDataset(latents, ["stage_a"])
    with pytest.raises(LatentDatasetError, match="rank 2 / world_size 2"):
        LatentDataset(latents, ["uid"], rank=2, world_size=2)
    with pytest.raises(LatentDatasetError, match="cannot be split over world_size 40"):
        LatentDataset(latents, ["uid"], world_size=40)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LatentDataset(str(tmp_path), ["uid"])


def test_writer_cuts_exact_row_groups_and_keeps_stats(tmp_path):
    shapes = {"text_emb": [3, 2]}
    rows = [3, 5, 2]
    tables = [ld.shard_table([f"k{i}"] * n, [f"u{i}-{j}" for j in range(n)], ["c"] * n,
                             {"text_emb": np.full((n, 3, 2), i, dtype=np.float16).tobytes()}, shapes)
              for i, n in enumerate(rows)]
    uri = str(tmp_path / "shard-00000.parquet")
    assert ld.write_shard(uri, tables, shapes, row_group_size=4, stats={"written": 10}) == 10
    handle = pq.ParquetFile(uri)
    assert [handle.metadata.row_group(i).num_rows for i in range(handle.metadata.num_row_groups)] == [4, 4, 2]
    assert json.loads(handle.schema_arrow.field("text_emb").metadata[ld.SHAPE_KEY]) == [3, 2]
    assert ld.read_shard_stats(uri) == ({"written": 10}, 10)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the temp file was renamed
    with pytest.raises(LatentDatasetError, match="a chunk has schema"):
        ld.write_shard(str(tmp_path / "bad.parquet"), tables, {"text_emb": [4]}, row_group_size=4)
    assert os.listdir(tmp_path) == ["shard-00000.parquet"]  # nothing half-written is left
    pq.write_table(tables[0], tmp_path / "plain.parquet")
    with pytest.raises(LatentDatasetError, match="not written by this phase"):
        ld.read_shard_stats(str(tmp_path / "plain.parquet"))


def test_reader_pickles_and_the_format_imports_no_torch(latents):
    import pickle
    import subprocess
    import sys

    ds = LatentDataset(latents, ["uid"], shuffle=False, infinite=False)
    copy = pickle.loads(pickle.dumps(ds))
    assert type(copy) is LatentDataset and isinstance(copy, torch.utils.data.IterableDataset)
    assert [item["uid"] for item in copy] == [item["uid"] for item in ds]
    # The phases' CPU tasks import the formats; torch would cost each worker seconds and ~700 MB.
    code = ("import sys; import pipelines.latent_shards, pipelines.image_shards, pipelines.precompute_cpu; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
