"""What several test modules share: tiny inputs written directly in the documented layouts (no precompute
or download run needed): a latent dataset (parquet shards + manifest + empty-caption embedding), random
tiny companion checkpoints, img2dataset-style webdataset image shards; and the MLflow client of a data
root's embedded SQLite store."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import latent_shards as ld

TEXT_TOKENS, TEXT_WIDTH = 77, 32  # the tiny CLIP's width = tiny Stage C c_cond = tiny Stage B clip_embd
SEMANTIC_SHAPE = (16, 4, 4)
STAGE_A_SHAPE = (4, 16, 16)


def write_latent_dataset(root: str, *, shards: tuple[int, ...] = (24, 24), row_group_size: int = 8, seed: int = 0,
                         companions: dict[str, str] | None = None, validation_fraction: float | None = None,
                         class_captions: tuple[str, ...] | None = None) -> str:
    """A latents/<version>-like dataset. Samples come from a few smooth 'classes' so there is
    structure to learn; text embeddings identify the class (plus noise). `shards` are the rows generated
    per shard; with `validation_fraction` the samples precompute's rule holds out go to val/ shards (and
    the manifest's `validation`); None: no validation split, as written before precompute had one.
    `class_captions`: the caption of each of the 4 classes (default "a picture of class <k>")."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = {"text_emb": (TEXT_TOKENS, TEXT_WIDTH), "semantic": SEMANTIC_SHAPE, "stage_a": STAGE_A_SHAPE}
    schema = ld.shard_schema(shapes)
    classes = 4
    class_text = rng.normal(size=(classes, TEXT_TOKENS, TEXT_WIDTH)).astype(np.float32)
    yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing="ij")
    class_latent = np.stack([np.stack([np.sin((k + 1) * xx + c) * np.cos((k + 2) * yy) for c in range(4)])
                             for k in range(classes)]).astype(np.float32)  # (classes, 4, 16, 16)
    entries, validation_entries = [], []
    index = 0
    for shard, rows in enumerate(shards):
        label = rng.integers(0, classes, size=rows)
        stage_a = class_latent[label] + 0.1 * rng.normal(size=(rows, *STAGE_A_SHAPE))
        # The semantic latent: a 4x4 pooled, 16-channel function of the Stage A latent.
        pooled = stage_a.reshape(rows, 4, 4, 4, 4, 4).mean(axis=(3, 5))  # (rows, 4, 4, 4)
        semantic = np.concatenate([pooled, -pooled, pooled ** 2, 0.5 * pooled], axis=1)
        text = class_text[label] + 0.05 * rng.normal(size=(rows, TEXT_TOKENS, TEXT_WIDTH))
        uids = [f"uid-{index + i:05d}" for i in range(rows)]
        table = pa.table({
            "key": [f"{shard:05d}{i:04d}" for i in range(rows)],
            "uid": uids,
            "caption": [class_captions[k] if class_captions else f"a picture of class {k}" for k in label],
            "text_emb": ld.tensor_column(text),
            "semantic": ld.tensor_column(semantic),
            "stage_a": ld.tensor_column(stage_a),
        }, schema=schema)
        name = f"shard-{shard:05d}.parquet"
        held_out = ld.is_validation(uids, validation_fraction or 0.0)
        if held_out.any():
            os.makedirs(os.path.join(root, ld.VALIDATION_DIR), exist_ok=True)
            with pq.ParquetWriter(os.path.join(root, ld.validation_file(name)), schema,
                                  **ld.parquet_writer_options(schema)) as writer:
                writer.write_table(table.filter(pa.array(held_out)), row_group_size=row_group_size)
            validation_entries.append({"file": ld.validation_file(name), "rows": int(held_out.sum())})
            table = table.filter(pa.array(~held_out))
        with pq.ParquetWriter(os.path.join(root, name), schema, **ld.parquet_writer_options(schema)) as writer:
            writer.write_table(table, row_group_size=row_group_size)
        entries.append({"file": name, "rows": table.num_rows})
        index += rows
    empty = rng.normal(size=(TEXT_TOKENS, TEXT_WIDTH)).astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, empty, allow_pickle=False)
    with open(os.path.join(root, "empty_text_emb.npy"), "wb") as f:
        f.write(buffer.getvalue())
    manifest = {
        "phase": "precompute", "version": os.path.basename(root), "shards": entries, "row_group_size": row_group_size,
        "columns": {k: {"shape": list(v), "dtype": "float16"} for k, v in shapes.items()},
        "empty_text_emb": {"file": "empty_text_emb.npy", "shape": [TEXT_TOKENS, TEXT_WIDTH], "dtype": "float16"},
        "counts": {"written": sum(shards)},
        "encoders": {name: {"checkpoint": path} for name, path in (companions or {}).items()},
    }
    if validation_fraction is not None:
        manifest["validation"] = {"fraction": validation_fraction, "rule": ld.VALIDATION_RULE,
                                  "samples": sum(e["rows"] for e in validation_entries), "shards": validation_entries}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def write_companions(root: str) -> dict[str, str]:
    """Random tiny stage_a / stage_b / stage_c / text checkpoints (stages.save format)."""
    from pipelines.generate import write_random_checkpoints

    write_random_checkpoints(root, preset="tiny", seed=0)
    return {name: os.path.join(root, name) for name in ("text", "stage_a", "stage_b", "stage_c")}


def write_image_shards(root: str, *, shards: int = 2, per_shard: int = 16, size: int = 48, seed: int = 0) -> str:
    """An images/<version>-like dataset: img2dataset webdataset tars with <key>.jpg/.txt/.json, the
    per-shard parquet (key, status) and a manifest. Images are smooth colour patterns (compressible,
    so a tiny VQGAN can learn them)."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    total = 0
    for shard in range(shards):
        keys, statuses = [], []
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                f1, f2, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6)
                pixels = np.stack([0.5 + 0.5 * np.sin(f1 * 6 * xx + phase), 0.5 + 0.5 * np.cos(f2 * 6 * yy + phase),
                                   0.5 + 0.5 * np.sin(3 * (xx + yy) + phase)], axis=-1)
                buffer = io.BytesIO()
                Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
                members = {f"{key}.jpg": buffer.getvalue(), f"{key}.txt": f"pattern {i}".encode(),
                           f"{key}.json": json.dumps({"uid": f"img-{shard}-{i}", "caption": f"pattern {i}"}).encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
                statuses.append("success")
        keys.append(f"{shard:05d}9999")  # a failed download: listed in the parquet, absent from the tar
        statuses.append("failed_to_download")
        pq.write_table(pa.table({"key": keys, "status": statuses}), os.path.join(root, f"{shard:05d}.parquet"))
        with open(os.path.join(root, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard + 1, "successes": per_shard}, f)
        total += per_shard
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"phase": "download", "version": os.path.basename(root), "counts": {"success": total}}, f)
    return root


def sqlite_tracking_uri(data_root: str) -> str:
    """The embedded MLflow store of a data root (what phases use without mlflow.tracking_uri)."""
    return f"sqlite:///{os.path.join(data_root, 'mlflow.db')}"


def mlflow_client(data_root: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sqlite_tracking_uri(data_root))


def write_tiny_clip(folder):
    """A random tiny open_clip CLIP (stages.text's wurst-tiny-clip config) saved as
    `<folder>/open_clip_model.safetensors`, the way a local CLIP checkpoint is laid out; returns the model."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from stages.text import TINY_CLIP_CONFIG, TINY_CLIP_NAME, register_open_clip_config

    register_open_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(str(folder), "open_clip_model.safetensors"))
    return model.eval()
