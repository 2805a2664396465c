"""The storage layer against a real S3-compatible server (moto's server mode on 127.0.0.1, started here):
URIs with options (`?endpoint_override=...&scheme=http`) keep them after the path through join / list /
basename, small files and latent shards are written atomically, a checkpoint directory is copied locally
once, and credentials come from the environment only (issue 21, the storage layer)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipelines import latent_shards, storage

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    moto_server = pytest.importorskip("moto.server")
    from cluster.local import free_ports

    (port,) = free_ports(1)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://wurst{options}&allow_bucket_creation=true")
    fs.create_dir("wurst")
    try:
        yield f"s3://wurst/data{options}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_uris_with_options_keep_them_after_the_path(s3):
    root, options = storage.split_options(s3)
    assert storage.join(s3, "latents", "v1") == f"{root}/latents/v1{options}"
    assert storage.basename(storage.join(s3, "shard-00000.parquet")) == "shard-00000.parquet"
    assert storage.normalize(root + "/" + options) == s3
    fs, path = storage.resolve(storage.join(s3, "x.json"))
    assert path == "wurst/data/x.json" and fs.type_name == "s3"


def test_files_listing_and_atomic_shards_on_the_server(s3, tmp_path):
    manifest = storage.join(s3, "v1", "manifest.json")
    storage.write_json(manifest, {"phase": "precompute", "n": 3})
    assert storage.read_json(manifest) == {"phase": "precompute", "n": 3} and storage.exists(manifest)
    shapes = {"text_emb": [2, 3]}
    table = latent_shards.shard_table(["k0", "k1"], ["u0", "u1"], ["a", "b"],
                                      {"text_emb": np.ones((2, 2, 3), np.float16).tobytes()}, shapes)
    shard = storage.join(s3, "v1", "shard-00000.parquet")
    assert latent_shards.write_shard(shard, [table], shapes, 1, {"written": 2}) == 2
    listed = storage.list_files(storage.join(s3, "v1"))
    assert listed == [manifest, shard]  # options kept, so each listed URI resolves to the same server
    assert latent_shards.read_shard_stats(listed[1]) == ({"written": 2}, 2)
    # No temporary key left behind by the atomic write.
    fs, path = storage.resolve(storage.join(s3, "v1"))
    assert sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))) == ["manifest.json",
                                                                                        "shard-00000.parquet"]
    # A checkpoint directory on the store is copied locally once.
    storage.write_bytes(storage.join(s3, "ckpt", "config.json"), b"{}")
    storage.write_bytes(storage.join(s3, "ckpt", "sub", "model.safetensors"), b"weights")
    local = storage.local_copy(storage.join(s3, "ckpt"))
    assert open(os.path.join(local, "sub", "model.safetensors"), "rb").read() == b"weights"
    storage.delete(storage.join(s3, "ckpt"))
    assert not storage.exists(storage.join(s3, "ckpt", "config.json"))
