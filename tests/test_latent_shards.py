"""The latent-dataset reader's contract: coverage, determinism, exact resume, column selection; the
trainer's loader path (`training.data.batches`): the same stream for any number of loader workers, each
row group read once per epoch per rank."""

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
from pipelines.training import data as training_data
from pipelines.training.config import DataConfig

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


# ------------------------------------------------------------------------------------------------
# The trainer's loader path: workers read pieces, the consumer assembles the batches


def _contract_stream(*, rank: int, world_size: int, seed: int, window: int, epochs: range) -> list[str]:
    """The module docstring's ordering contract, written out on its own (no reader code): the uids
    of S(rank, e) for each e in `epochs`, concatenated."""
    blocks = [(shard, group, min(ROW_GROUP, rows - group * ROW_GROUP))
              for shard, rows in enumerate(SHARD_ROWS) for group in range(-(-rows // ROW_GROUP))]
    per_rank = N // world_size
    out: list[str] = []
    for epoch in epochs:
        sequence = [_uid(shard, group * ROW_GROUP + i)
                    for b in np.random.default_rng([seed, epoch]).permutation(len(blocks))
                    for shard, group, rows in [blocks[b]] for i in range(rows)]
        ranks_part = sequence[rank * per_rank:(rank + 1) * per_rank]
        for q, lo in enumerate(range(0, per_rank, window)):
            part = ranks_part[lo:lo + window]
            out += [part[i] for i in np.random.default_rng([seed, epoch, rank, world_size, q]).permutation(len(part))]
    return out


# 3 loader workers on a 2-CPU machine: torch warns; the order under test does not depend on the CPUs.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _loader(ds: LatentDataset, workers: int):
    return training_data.batches(ds, DataConfig(seed=0, loader_workers=workers), torch.device("cpu"))


def _global_index(uid: str) -> int:
    shard, row = (int(p[1:]) for p in uid.split("-"))
    return int(np.cumsum([0] + SHARD_ROWS)[shard]) + row


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_loader_stream_is_the_contract_for_any_worker_count(latents, workers):
    # Infinite mode over three epochs (15 samples per rank), batches across window and epoch edges.
    kwargs = dict(world_size=2, rank=1, seed=11, batch_size=4, shuffle_window=6)
    batches = list(itertools.islice(_loader(LatentDataset(latents, ["uid", "text_emb"], **kwargs), workers), 11))
    assert [len(b["uid"]) for b in batches] == [4] * 11
    assert _uids(batches, batched=True) == _contract_stream(rank=1, world_size=2, seed=11, window=6,
                                                           epochs=range(3))[:44]
    for batch in batches:  # each tensor row is its uid's sample (text_emb holds the global index)
        assert batch["text_emb"].dtype == torch.float16 and batch["text_emb"].shape == (4, 3, 2)
        expected = torch.tensor([_global_index(u) for u in batch["uid"]], dtype=torch.float16)
        assert torch.equal(batch["text_emb"][:, 0, 0], expected)
        assert torch.all(batch["text_emb"] == batch["text_emb"][:, :1, :1])

    # Epoch mode: the short last batch, drop_last, and single samples (batch_size=None).
    epoch = _contract_stream(rank=0, world_size=1, seed=3, window=5, epochs=range(1))
    full = list(_loader(LatentDataset(latents, ["uid", "semantic"], seed=3, shuffle_window=5, batch_size=7,
                                      infinite=False), workers))
    assert [len(b["uid"]) for b in full] == [7, 7, 7, 7, 3] and _uids(full, batched=True) == epoch
    assert full[0]["semantic"].shape == (7, 2, 2, 2)
    dropped = _loader(LatentDataset(latents, ["uid"], seed=3, shuffle_window=5, batch_size=7, infinite=False,
                                    drop_last=True), workers)
    assert _uids(dropped, batched=True) == epoch[:28]
    samples = list(_loader(LatentDataset(latents, ["uid", "semantic"], seed=3, shuffle_window=5,
                                         infinite=False), workers))
    assert _uids(samples, batched=False) == epoch
    assert samples[0]["semantic"].shape == (2, 2, 2)
    assert torch.all(samples[0]["semantic"] == -float(_global_index(samples[0]["uid"])))


@pytest.mark.parametrize("offset", [0, 3, 7, 14, 15, 26, 44])
def test_loader_resume_with_two_workers_is_the_tail_of_the_stream(latents, offset):
    """Offsets inside a window (the blocks before the offset are skipped), at a window edge, at and
    after an epoch edge (15 samples per rank per epoch)."""
    kwargs = dict(world_size=2, rank=0, seed=5, batch_size=3, shuffle_window=4)
    stream = _contract_stream(rank=0, world_size=2, seed=5, window=4, epochs=range(6))
    resumed = _loader(LatentDataset(latents, ["uid"], start_offset=offset, **kwargs), workers=2)
    assert _uids(itertools.islice(resumed, 8), batched=True) == stream[offset:offset + 24]
    in_epoch = _loader(LatentDataset(latents, ["uid"], start_offset=offset % 15, infinite=False, **kwargs), 2)
    assert _uids(in_epoch, batched=True) == stream[offset % 15:15]


@pytest.fixture
def read_log(tmp_path, monkeypatch):
    """Every row-group read of the reader's pyarrow call, as (shard, row group) -- also from DataLoader
    workers (forked, so they inherit the patch; each read is one O_APPEND line of a shared file)."""
    path = tmp_path / "reads.log"
    original = pq.ParquetFile.read_row_group

    def logged(self, i, columns=None, **kwargs):
        table = original(self, i, columns=columns, **kwargs)
        shard, row = (int(p[1:]) for p in table.column("uid")[0].as_py().split("-"))
        with open(path, "a") as log:
            log.write(f"{shard} {row // ROW_GROUP}\n")
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", logged)

    def reads() -> list[tuple[int, int]]:
        lines = path.read_text().split() if path.exists() else []
        path.unlink(missing_ok=True)
        return [(int(a), int(b)) for a, b in zip(lines[::2], lines[1::2])]

    return reads


def _range_blocks(ds: LatentDataset, epoch: int, first: int = 0) -> set[tuple[int, int]]:
    """(shard, row group) of the blocks holding samples first.. of the rank's epoch sequence."""
    return {(s, r // ROW_GROUP) for s, r in ds.epoch_order(epoch)[first:]}


@pytest.mark.parametrize("workers", [2, 3])
def test_loader_reads_each_block_of_the_ranks_range_once_per_epoch(latents, read_log, workers):
    for rank in range(2):
        for epoch in range(2):
            ds = LatentDataset(latents, ["uid", "text_emb"], rank=rank, world_size=2, seed=9, epoch=epoch,
                               batch_size=2, shuffle_window=5, infinite=False)
            assert len(_uids(_loader(ds, workers), batched=True)) == N // 2
            reads = read_log()
            assert len(reads) == len(set(reads)), f"a block was read twice: {sorted(reads)}"
            assert set(reads) == _range_blocks(ds, epoch)
    # A resume inside a window reads only the blocks holding samples still to come, each once.
    ds = LatentDataset(latents, ["uid", "text_emb"], seed=9, batch_size=2, shuffle_window=12, start_offset=9,
                       infinite=False)
    assert len(_uids(_loader(ds, workers), batched=True)) == N - 9
    reads = read_log()
    assert len(reads) == len(set(reads)) and set(reads) == _range_blocks(ds, 0, first=9)
    # A plain DataLoader over the dataset keeps the stream but reads every block in every worker.
    plain = DataLoader(LatentDataset(latents, ["uid"], seed=9, batch_size=2, infinite=False), batch_size=None,
                       num_workers=workers)
    assert len(_uids(plain, batched=True)) == N
    assert len(read_log()) == workers * len(_range_blocks(ds, 0))


def test_assemble_refuses_pieces_out_of_order(latents):
    ds = LatentDataset(latents, ["uid"], seed=1, batch_size=4, infinite=False)
    pieces = list(ds.read_pieces())
    pieces[0], pieces[1] = pieces[1], pieces[0]
    with pytest.raises(LatentDatasetError, match="pieces arrived out of order"):
        list(ds.assemble(pieces))


def test_a_storage_failure_mid_write_publishes_no_shard_on_an_object_store():
    """Issue 22: on an object store a stream that fails is still closed, which publishes what it had (S3
    completes the multipart upload). write_shard writes a temporary key and renames it only once complete."""
    fsspec_memory = pytest.importorskip("fsspec.implementations.memory")
    import pyarrow.fs as pafs

    class FailingMemory(fsspec_memory.MemoryFileSystem):
        """An in-memory object store (closing a file publishes it) whose writes fail after `budget` bytes."""
        budget = 0

        def _open(self, path, mode="rb", **kwargs):
            handle = super()._open(path, mode, **kwargs)
            if "w" in mode and FailingMemory.budget:
                write, left = handle.write, [FailingMemory.budget]

                def failing_write(data):
                    left[0] -= len(data)
                    if left[0] < 0:
                        raise OSError("injected storage failure in the middle of a write")
                    return write(data)
                handle.write = failing_write
            return handle

    memory = FailingMemory()
    memory.store.clear()
    store = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    rows = 40
    values = np.arange(rows * 6, dtype=np.float16).reshape(rows, 3, 2)
    shapes = {"text_emb": [3, 2]}
    table = ld.shard_table([f"k{i}" for i in range(rows)], [f"u{i}" for i in range(rows)], ["c"] * rows,
                           {"text_emb": values.tobytes()}, shapes)
    uri = "s3://bucket/latents/v1/shard-00000.parquet"  # never resolved: the injected store is used
    FailingMemory.budget = 300
    with pytest.raises(OSError, match="injected storage failure"):
        ld.write_shard(uri, [table], shapes, 8, {"written": rows}, filesystem=store)
    assert memory.find("/bucket") == []  # no final object, and the temporary one is gone
    FailingMemory.budget = 0
    assert ld.write_shard(uri, [table], shapes, 8, {"written": rows}, filesystem=store) == rows
    assert [p.rsplit("/", 1)[1] for p in memory.find("/bucket")] == ["shard-00000.parquet"]
