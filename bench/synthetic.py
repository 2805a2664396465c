"""Synthetic latent datasets for the training benchmarks: random fp16 tensors of the paper's shapes in the
real latent-shard format (writer options, manifest, empty-caption embedding), no precompute run needed."""

from __future__ import annotations

import os

import numpy as np

from pipelines import latent_shards as ld


def write_dataset(root: str, shapes: dict[str, tuple[int, ...]], rows: int, row_group_size: int) -> str:
    """A latent dataset of random fp16 tensors (random PNG pixels for an image column such as semantic_image) in
    the real format (writer options, manifest, empty caption)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    schema = ld.shard_schema(shapes)
    shards, written, per_shard = [], 0, max(row_group_size, -(-rows // 4))
    while written < rows:
        n = min(per_shard, rows - written)
        uids = [f"u{written + i:08d}" for i in range(n)]
        columns = {"key": uids, "uid": uids, "caption": [""] * n}
        for c, s in shapes.items():
            if c in ld.IMAGE_COLUMNS:  # random pixels, encoded as precompute stores them
                images = rng.integers(0, 256, size=(n, *s), dtype=np.uint8)
                columns[c] = pa.array([ld.encode_image(i, ld.IMAGE_COLUMNS[c]) for i in images], pa.binary())
            else:
                columns[c] = ld.tensor_column(rng.standard_normal((n, *s), dtype=np.float32).astype(np.float16))
        name = f"shard-{len(shards):05d}.parquet"
        table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
        with pq.ParquetWriter(os.path.join(root, name), schema, **ld.parquet_writer_options(schema)) as writer:
            writer.write_table(table, row_group_size=row_group_size)
        shards.append({"file": name, "rows": n})
        written += n
    empty = ld.write_empty_text(root, np.zeros(shapes["text_emb"], dtype=np.float16))
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"phase": "precompute", "version": os.path.basename(root), "shards": shards,
                   "row_group_size": row_group_size, "empty_text_emb": empty, "counts": {"written": written},
                   "columns": {c: ld.column_spec(c, list(s)) for c, s in shapes.items()}}, f)
    return root
