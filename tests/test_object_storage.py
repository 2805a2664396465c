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
    import ray

    if ray.is_initialized():  # a Ray an earlier module left running: its workers lack the credentials above, as
        ray.shutdown()        # a node started without them would; this module's Ray starts with them
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
    # An image shard's side files (its results, selection and stats) keep them too.
    from pipelines import image_shards

    files = image_shards.shard_files(storage.join(s3, "images", "v1"), "00003")
    assert files == {kind: f"{root}/images/v1/00003{suffix}{options}" for kind, suffix in (
        ("tar", ".tar"), ("parquet", ".parquet"), ("selection", "_selection.parquet"), ("stats", "_stats.json"))}
    assert image_shards.is_selection(files["selection"]) and not image_shards.is_selection(files["tar"])
    assert image_shards.source_name(files["selection"]) == image_shards.source_name(files["tar"]) == "00003"


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


@pytest.mark.slow_e2e  # ~15-25 s each; the default suite keeps the storage-layer checks
def test_filter_reads_and_writes_the_object_store(s3, embedded_ray, tmp_path):
    """The filter phase with its input and output on the S3 server (Ray tasks read and write there)."""
    import json

    from pipelines import filter as filter_phase
    from test_laion_releases import N, _rows, _write

    rows = _rows(5)
    local = tmp_path / "laion" / "part-00000.parquet"
    _write(str(local), rows, {"URL": "URL", "TEXT": "TEXT", "WIDTH": "WIDTH", "HEIGHT": "HEIGHT",
                              "similarity": "similarity", "punsafe": "punsafe", "pwatermark": "pwatermark",
                              "AESTHETIC_SCORE": "aesthetic", "hash": "hash"})
    source = storage.join(s3, "laion", "part-00000.parquet")
    storage.write_bytes(source, local.read_bytes())
    result = filter_phase.main(["--input", storage.join(s3, "laion"), "--output", storage.join(s3, "filtered"),
                                "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false",
                                "--set", "dedup.num_buckets=2"])
    assert result.output.startswith("s3://wurst/data/filtered/") and storage.split_options(result.output)[1]
    funnel = storage.read_json(storage.join(result.output, "funnel.json"))
    assert funnel["rows_read"] == N and storage.exists(storage.join(result.output, "manifest.json"))
    parts = [f for f in storage.list_files(result.output) if storage.basename(f).startswith("part-")]
    assert sum(latent_shards.pq.read_metadata(storage.local_copy(p)).num_rows for p in parts) == funnel["rows_written"]
    assert not any("_work.tmp" in f for f in storage.list_files(result.output, recursive=True))
    assert json.dumps(result.manifest).count("testing") == 0  # no credentials in the manifest


def _upload(local_dir: str, uri: str) -> None:
    for root, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(root, name)
            storage.write_bytes(storage.join(uri, os.path.relpath(path, local_dir)), open(path, "rb").read())


@pytest.mark.slow_e2e  # ~15-25 s each; the default suite keeps the storage-layer checks
def test_precompute_reads_and_writes_the_object_store(s3, embedded_ray, tmp_path):
    """Precompute with its image-shard input, encoder checkpoints and latent output on the S3 server."""
    import torch

    import helpers
    import stages
    from pipelines import precompute
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    images = helpers.write_image_shards(str(tmp_path / "images"), shards=2, per_shard=6, size=48)
    _upload(images, storage.join(s3, "images", "v1"))
    torch.manual_seed(0)
    for name, model in (("text", TextEncoder(TextEncoderConfig.tiny())),
                        ("semantic", SemanticCompressor(SemanticCompressorConfig.tiny())),
                        ("stage_a", StageA(StageAConfig.tiny()))):
        stages.save(model, tmp_path / "ckpt" / name)
    _upload(str(tmp_path / "ckpt"), storage.join(s3, "ckpt"))
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "precompute-tiny.yaml")
    result = precompute.main(["--config", config, "--set", f"input={storage.join(s3, 'images', 'v1')}",
                              "--set", f"output={storage.join(s3, 'latents')}", "--set", f"data_root={tmp_path}",
                              "--set", "mlflow.enabled=false",
                              *[a for k in ("text", "semantic", "stage_a")
                                for a in ("--set", f"encoders.{k}={storage.join(s3, 'ckpt', k)}")]])
    counts = result.manifest["counts"]
    assert counts["input_samples"] == 12 == counts["written"] + counts["skipped"]
    reader = latent_shards.LatentDataset(result.output, ["uid", "stage_a"], shuffle=False, infinite=False,
                                         batch_size=4)
    assert sum(len(b["uid"]) for b in reader) == counts["train"]


@pytest.mark.slow_e2e  # ~15-25 s each; the default suite keeps the storage-layer checks
def test_stage_b_trains_with_its_run_on_the_object_store(s3, embedded_ray, tmp_path):
    """Stage B (tiny, Ray Train + DeepSpeed on gloo) from latents on the server, its run directory --
    checkpoints, run.json, the export -- on the server too; the export loads back from there."""
    import helpers
    import stages
    from pipelines import export_layout, train

    latents = helpers.write_latent_dataset(str(tmp_path / "latents" / "v1"))
    _upload(latents, storage.join(s3, "latents", "v1"))
    runs = storage.join(s3, "runs")
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train-b-tiny.yaml")
    args = ["--config", config, "--set", f"input={storage.join(s3, 'latents', 'v1')}", "--set", f"output={runs}",
            "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false", "--set", "train.num_workers=1",
            "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "validation.every=0",
            "--set", "sampling.every=0", "--set", "run_name=b-s3"]
    train.main(args)
    run_dir = storage.join(runs, "b-s3")
    assert storage.exists(storage.join(run_dir, "run.json"))
    assert any(storage.basename(d).startswith("checkpoint_") for d in storage.list_dirs(run_dir))
    export = storage.join(run_dir, "export", "stage_b")
    model = stages.load(storage.local_copy(export_layout.resolve_checkpoint(export)), expected_kind="stage_b")
    assert model.config.c_in == 4


def test_generate_reads_checkpoints_from_the_object_store(s3, tmp_path):
    from pipelines.generate import generate_images, write_random_checkpoints

    local = write_random_checkpoints(tmp_path / "checkpoints", seed=0)
    _upload(str(local), storage.join(s3, "generation-set"))
    result = generate_images(["a red cube"], checkpoints=storage.join(s3, "generation-set"), n=1, height=128,
                             width=128, steps_c=2, steps_b=2, seed=0)
    assert result.images[0].size == (128, 128)


@pytest.mark.slow_e2e  # ~15-25 s each; the default suite keeps the storage-layer checks
def test_download_writes_its_shards_to_the_object_store(s3, embedded_ray, tmp_path):
    """Download from a loopback HTTP server into the S3 server (shards published there, stats last), then a
    re-filtered version reading the first one's samples there by range reads (a selection), and a resume that
    verifies the finished shards on the store without fetching again."""
    import json

    from test_refilter import GONE, CountingServer, filter_version, rows, run, version_samples

    server = CountingServer()
    try:
        all_rows = rows(server)
        filtered = str(tmp_path / "filtered")
        base_in, base = filter_version(filtered, "base", all_rows, 4.5)
        tight_in, tight = filter_version(filtered, "tight", all_rows, 5.5)
        images = storage.join(s3, "images")
        first = run(base_in, str(tmp_path), output=images)
        assert first.output.startswith("s3://wurst/data/images/") and storage.split_options(first.output)[1]
        listed = {storage.basename(f) for f in storage.list_files(first.output)}
        assert {"00000.tar", "00000.parquet", "00000_stats.json", "manifest.json", "report.json"} <= listed
        samples = version_samples(first.output)
        assert len(samples) == first.counts["samples"] == sum(r["row"] not in GONE for r in base)
        hits = server.snapshot()
        again = run(base_in, str(tmp_path), output=images)
        assert again.skipped and server.snapshot() == hits
        second = run(tight_in, str(tmp_path), output=images)
        assert server.snapshot() == hits and second.manifest["reuse_pool"] == [first.version]
        tight_samples = version_samples(second.output)
        assert set(tight_samples) == {r["uid"] for r in tight if r["row"] not in GONE}
        assert all(tight_samples[u]["jpg"] == samples[u]["jpg"] for u in tight_samples)
        assert json.dumps(first.manifest).count("testing") == 0  # no credentials in the manifest
    finally:
        server.close()


@pytest.mark.slow_e2e
def test_the_chain_with_every_dataset_checkpoint_and_export_on_the_object_store(s3, embedded_ray, tmp_path):
    """filter -> download -> precompute -> Stage C training -> generation, every dataset, encoder checkpoint, run
    directory and export on the S3 server (issue 21): LAION-shaped metadata there, images fetched from a loopback
    HTTP server. Local disk holds only scratch space and caches."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import stages
    from pipelines import export_layout, precompute, train
    from pipelines import filter as filter_phase
    from pipelines.generate import generate_images, write_random_checkpoints
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from test_refilter import CountingServer, run

    base = storage.join(s3, "chain")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = CountingServer()
    try:
        n = 24
        table = pa.table({"URL": [f"http://127.0.0.1:{server.port}/img/{i}.jpg" for i in range(n)],
                          "TEXT": [f"a photo of thing {i}" for i in range(n)],
                          "WIDTH": pa.array([1024] * n, pa.int64()), "HEIGHT": pa.array([1024] * n, pa.int64()),
                          "similarity": [0.35] * n, "punsafe": pa.array([0.0] * n, pa.float32()),
                          "pwatermark": pa.array([0.1] * n, pa.float32()),
                          "AESTHETIC_SCORE": pa.array([6.5] * n, pa.float32()), "hash": pa.array(range(n), pa.int64())})
        pq.write_table(table, tmp_path / "laion.parquet")
        storage.write_bytes(storage.join(base, "laion", "part-00000.parquet"), (tmp_path / "laion.parquet").read_bytes())
        filtered = filter_phase.main(["--input", storage.join(base, "laion"), "--output", storage.join(base, "filtered"),
                                      "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false",
                                      "--set", "dedup.num_buckets=2"])
        assert storage.read_json(storage.join(filtered.output, "funnel.json"))["rows_written"] == n

        images = run(filtered.output, str(tmp_path), output=storage.join(base, "images"))
        assert images.counts["samples"] == n and server.snapshot() == {f"/img/{i}.jpg": 1 for i in range(n)}

        torch.manual_seed(0)
        local_set = write_random_checkpoints(tmp_path / "random-set", seed=0)  # text, stage_a, stage_b, stage_c
        stages.save(SemanticCompressor(SemanticCompressorConfig.tiny()), local_set / "semantic")
        _upload(str(local_set), storage.join(base, "checkpoints"))
        latents = precompute.main([
            "--config", os.path.join(repo, "configs", "precompute-tiny.yaml"), "--set", f"input={images.output}",
            "--set", f"output={storage.join(base, 'latents')}", "--set", f"data_root={tmp_path}",
            "--set", "mlflow.enabled=false", "--set", "outputs=[text,semantic]",
            *[a for k in ("text", "semantic") for a in ("--set", f"encoders.{k}={storage.join(base, 'checkpoints', k)}")]])
        assert latents.manifest["counts"]["written"] == n

        train.main(["--config", os.path.join(repo, "configs", "train-c-tiny.yaml"), "--set", f"input={latents.output}",
                    "--set", f"output={storage.join(base, 'runs')}", "--set", f"data_root={tmp_path}",
                    "--set", "mlflow.enabled=false", "--set", "train.num_workers=1", "--set", "train.max_steps=4",
                    "--set", "train.checkpoint_every=2", "--set", "validation.every=0", "--set", "sampling.every=0",
                    "--set", "run_name=c-chain"])
        export = export_layout.resolve_checkpoint(storage.join(base, "runs", "c-chain", "export", "stage_c"))
        assert storage.is_remote(export)
        # The generation set on the store: the trained Stage C next to the other components.
        _upload(storage.local_copy(export), storage.join(base, "generation-set", "stage_c"))
        for component in ("stage_b", "stage_a", "text"):
            _upload(str(local_set / component), storage.join(base, "generation-set", component))
        result = generate_images(["a photo of thing 3"], checkpoints=storage.join(base, "generation-set"), n=1,
                                 height=128, width=128, steps_c=2, steps_b=2, seed=0)
        assert result.images[0].size == (128, 128)
        # Nothing but scratch and caches on local disk: no phase wrote a dataset under the data root.
        assert not {"filtered", "images", "latents", "runs"} & set(os.listdir(tmp_path))
    finally:
        server.close()
