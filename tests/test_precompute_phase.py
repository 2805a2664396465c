"""Phase `precompute` end to end on tiny presets: a download-like webdataset output -> latent shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import config as config_lib
from pipelines import latent_shards as ld
from pipelines import precompute, precompute_cpu
from pipelines import tracking

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES_PER_SHARD = 6
N_SHARDS = 4


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _image(kind: str, rng: np.random.Generator) -> tuple[str, bytes]:
    """(extension, bytes) of a test image; sizes are non-square on purpose (center crop)."""
    pixels = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    if kind == "rgb":
        return "jpg", _encode(Image.fromarray(pixels), "JPEG")
    if kind == "gray":
        return "jpg", _encode(Image.fromarray(pixels[..., 0], mode="L"), "JPEG")
    if kind == "cmyk":
        return "jpg", _encode(Image.fromarray(pixels).convert("CMYK"), "JPEG")
    if kind == "rgba":
        alpha = rng.integers(0, 256, size=(40, 56, 1), dtype=np.uint8)
        return "png", _encode(Image.fromarray(np.concatenate([pixels, alpha], axis=2), mode="RGBA"), "PNG")
    if kind == "corrupt":
        return "jpg", b"\xff\xd8\xff\xe0 definitely not a JPEG " + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
    if kind == "truncated":
        return "jpg", _encode(Image.fromarray(pixels), "JPEG")[:300]
    raise ValueError(kind)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def make_download_output(root: str) -> dict:
    """img2dataset-like webdataset shards NNNNN.tar (+ stats + manifest), with special images in
    shard 0: grayscale, CMYK, RGBA (converted), corrupt and truncated (skipped)."""
    os.makedirs(root)
    rng = np.random.default_rng(0)
    special = {0: "gray", 1: "cmyk", 2: "rgba", 3: "corrupt", 4: "truncated"}
    for shard in range(N_SHARDS):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for i in range(SAMPLES_PER_SHARD):
                key = f"{shard:05d}{i:04d}"
                kind = special.get(i, "rgb") if shard == 0 else "rgb"
                ext, data = _image(kind, rng)
                caption = f"a photo number {shard * SAMPLES_PER_SHARD + i}"
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"uid": f"uid-{key}", "caption": caption, "key": key}).encode())
        with open(os.path.join(root, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"count": SAMPLES_PER_SHARD, "successes": SAMPLES_PER_SHARD}, f)
    manifest = {"phase": "download", "counts": {"succeeded": N_SHARDS * SAMPLES_PER_SHARD}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    import stages
    from stages.semantic import SemanticCompressor, SemanticCompressorConfig
    from stages.stage_a import StageA, StageAConfig
    from stages.text import TextEncoder, TextEncoderConfig

    base = tmp_path_factory.mktemp("precompute")
    images = str(base / "images" / "v1")
    make_download_output(images)
    torch.manual_seed(0)
    checkpoints = base / "checkpoints"
    stages.save(TextEncoder(TextEncoderConfig.tiny()), checkpoints / "text")
    stages.save(SemanticCompressor(SemanticCompressorConfig.tiny()), checkpoints / "semantic")
    stages.save(StageA(StageAConfig.tiny()), checkpoints / "stage_a")
    overrides = [f"input={images}", f"encoders.text={checkpoints / 'text'}",
                 f"encoders.semantic={checkpoints / 'semantic'}", f"encoders.stage_a={checkpoints / 'stage_a'}",
                 f"data_root={base / 'data'}"]
    return base, overrides


def _config(overrides: list[str], *extra: str) -> precompute.PrecomputeConfig:
    return config_lib.load(precompute.PrecomputeConfig, os.path.join(REPO_ROOT, "configs", "precompute-tiny.yaml"),
                           [*overrides, *extra])


def _shard_tables(out_dir: str) -> dict[str, tuple]:
    tables = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".parquet"):
            handle = pq.ParquetFile(os.path.join(out_dir, name))
            tables[name] = (handle.read(), handle.metadata.metadata[ld.STATS_KEY],
                            [handle.metadata.row_group(i).num_rows for i in range(handle.metadata.num_row_groups)])
    return tables


# Ray 2.60 gives an embedded node a fixed 30 s to register; on a heavily shared CI machine that can
# time out before the phase starts. Such a start is retried: it says nothing about the phase.
RAY_START_TIMEOUT = "The current node timed out during startup"


def _run_and_kill_after_first_shard(args: list[str], env: dict, out_dir: str, log_path) -> tuple[int, str]:
    """Start the phase as a subprocess, SIGKILL its process group (driver + the embedded Ray it
    started) as soon as a finished shard file appears; returns (return code, log tail)."""
    for _attempt in range(3):
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=log_file,
                                    stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 600  # a safety net only
                while time.time() < deadline and proc.poll() is None:
                    if os.path.isdir(out_dir) and any(n.endswith(".parquet") for n in os.listdir(out_dir)):
                        break
                    time.sleep(0.01)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        output = log_path.read_text(errors="replace")
        if proc.returncode != 1 or RAY_START_TIMEOUT not in output:
            break
    return proc.returncode, output[-3000:]


@pytest.mark.e2e
def test_precompute_end_to_end_resume_and_noop(setup):
    base, overrides = setup
    # The format, counts and resume with every sample in the training split (the split: test_validation).
    overrides = overrides + ["validation_fraction=0"]
    cfg = _config(overrides, f"output={base / 'latents-a'}")
    out_dir = precompute.output_dir(cfg)
    result = precompute.main(["--config", os.path.join(REPO_ROOT, "configs", "precompute-tiny.yaml"),
                              *[a for o in overrides + [f"output={base / 'latents-a'}"] for a in ("--set", o)]])
    manifest = result.manifest
    assert os.path.basename(out_dir) == manifest["version"] == result.version
    assert result.output == out_dir and not result.skipped

    # Counts: every input sample is written or skipped with a named reason.
    counts = manifest["counts"]
    total = N_SHARDS * SAMPLES_PER_SHARD
    assert counts["input_samples"] == total == counts["written"] + counts["skipped"]
    assert counts["skipped_by_reason"] == {"decode_error": 2}
    assert counts["written"] == total - 2
    assert counts["converted_by_mode"] == {"CMYK": 1, "L": 1, "RGBA": 1}
    assert [s["rows"] for s in manifest["shards"]] == [SAMPLES_PER_SHARD - 2] + [SAMPLES_PER_SHARD] * (N_SHARDS - 1)
    # Shapes and dtypes: tiny text width 32; semantic 64 px / 32 -> 2x2; Stage A 32 px / 4 -> 8x8.
    assert manifest["columns"] == {"text_emb": {"shape": [77, 32], "dtype": "float16"},
                                   "semantic": {"shape": [16, 2, 2], "dtype": "float16"},
                                   "stage_a": {"shape": [4, 8, 8], "dtype": "float16"}}
    assert set(manifest["encoders"]) == {"text", "semantic", "stage_a"}
    assert all(len(e["sha256"]) == 64 for e in manifest["encoders"].values())
    assert manifest["input"]["identity"].startswith("manifest:")
    assert manifest["input_manifest_hash"] == manifest["input"]["identity"].split(":", 1)[1]
    empty = np.load(os.path.join(out_dir, "empty_text_emb.npy"))
    assert empty.shape == (77, 32) and empty.dtype == np.float16
    assert not os.path.exists(os.path.join(out_dir, precompute.PARTS_DIR))

    # The shards: one per input tar, row groups of row_group_size, float16 fixed-size lists.
    tables = _shard_tables(out_dir)
    assert sorted(tables) == [f"shard-{i:05d}.parquet" for i in range(N_SHARDS)]
    first, stats, groups = tables["shard-00000.parquet"]
    assert groups == [4]
    assert str(first.schema.field("text_emb").type) == "fixed_size_list<element: halffloat>[2464]"
    assert first.column("uid").to_pylist() == [f"uid-00000{i:04d}" for i in (0, 1, 2, 5)]
    skipped = json.loads(stats)["skipped_samples"]
    assert [(s[0], s[2]) for s in skipped] == [("000000003", "decode_error"), ("000000004", "decode_error")]
    # The report: written vs skipped by reason, the skipped samples named.
    pictures = json.load(open(os.path.join(out_dir, "report", "report.json")))
    assert pictures["kept"] == total - 2 and pictures["dropped_by_reason"] == {"decode_error": 2}
    assert [r["key"] for r in pictures["samples"]["decode_error"]] == ["000000003", "000000004"]
    assert os.path.getsize(os.path.join(out_dir, "report", "reasons.png")) > 1000

    # Encoders really ran: the reader gets the embedding of each caption and distinct image latents.
    from stages import load

    text = load(manifest["encoders"]["text"]["checkpoint"])
    reader = ld.LatentDataset(out_dir, ["uid", "caption", "text_emb", "stage_a"], shuffle=False, infinite=False,
                              batch_size=8)
    batch = next(iter(reader))
    expected = text.encode(batch["caption"]).detach().half()
    np.testing.assert_allclose(batch["text_emb"].float().numpy(), expected.float().numpy(), atol=2e-3)
    assert not np.allclose(batch["stage_a"][0].numpy(), batch["stage_a"][1].numpy())
    np.testing.assert_allclose(empty, text.empty_embedding()[0].detach().half().numpy(), atol=2e-3)

    # MLflow: a run with counts and lineage.
    runs = tracking.find_runs("precompute", tracking_uri=tracking.tracking_uri_for(cfg.data_root))
    assert runs and runs[0].info.run_id == manifest["mlflow_run_id"]
    assert runs[0].data.metrics["written"] == counts["written"]
    assert runs[0].data.metrics["skipped.decode_error"] == 2
    assert runs[0].data.tags["wurst.input_manifest_hash"] == manifest["input_manifest_hash"]

    # A second run with the same config is a no-op: same manifest, files untouched.
    mtimes = {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir)}
    again = precompute.run(cfg)
    assert again.skipped and again.manifest == manifest
    assert {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir)} == mtimes

    # Killed after its first shard file appears, then rerun: identical shards to the uninterrupted run.
    killed_root = str(base / "latents-b")
    killed_cfg = _config(overrides, f"output={killed_root}", "mlflow.enabled=false")
    killed_dir = precompute.output_dir(killed_cfg)
    assert os.path.basename(killed_dir) == manifest["version"]  # the output root is not part of the version
    args = [sys.executable, "-m", "pipelines.precompute", "--config",
            os.path.join(REPO_ROOT, "configs", "precompute-tiny.yaml")]
    for o in overrides + [f"output={killed_root}", "mlflow.enabled=false"]:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    returncode, output = _run_and_kill_after_first_shard(args, env, killed_dir, base / "killed-run.log")
    assert returncode == -signal.SIGKILL, f"the phase ended by itself (rc {returncode}):\n{output}"
    assert not os.path.exists(os.path.join(killed_dir, "manifest.json")), "the phase finished before it was killed"
    partial = [n for n in os.listdir(killed_dir) if n.endswith(".parquet")]
    assert 1 <= len(partial) < N_SHARDS, output
    resumed = precompute.run(killed_cfg).manifest
    assert resumed["counts"] == counts and resumed["shards"] == manifest["shards"]
    again_tables = _shard_tables(killed_dir)
    assert sorted(again_tables) == sorted(tables)
    for name, (table, stats, groups) in tables.items():
        other_table, other_stats, other_groups = again_tables[name]
        assert other_table.equals(table), f"{name} differs after kill + resume"
        assert other_stats == stats and other_groups == groups


def test_config_errors_name_the_key(setup, tmp_path):
    base, overrides = setup
    with pytest.raises(config_lib.ConfigError, match="encoders.stage_a: required"):
        _config([o for o in overrides if not o.startswith("encoders.stage_a")])
    with pytest.raises(config_lib.ConfigError, match="semantic_resolution: must be a multiple of 32"):
        _config(overrides, "semantic_resolution=100")
    with pytest.raises(config_lib.ConfigError, match="outputs"):
        _config(overrides, "outputs=[text, depth]")
    no_manifest = tmp_path / "images"
    no_manifest.mkdir()
    with pytest.raises(config_lib.ConfigError, match="no manifest.json"):
        precompute.output_dir(_config(overrides, f"input={no_manifest}"))


def test_version_follows_output_affecting_settings_only(setup):
    base, overrides = setup
    version = os.path.basename(precompute.output_dir(_config(overrides)))
    assert os.path.basename(precompute.output_dir(_config(overrides, "batch_size=2", "actors=2"))) == version
    assert os.path.basename(precompute.output_dir(_config(overrides, "stage_a_resolution=64"))) != version
    assert os.path.basename(precompute.output_dir(_config(overrides, "outputs=[text, semantic]"))) != version
    assert os.path.basename(precompute.output_dir(_config(overrides, "validation_fraction=0.05"))) != version
    # No split (fraction 0) writes what the phase wrote before it had one: that keeps the earlier version.
    assert "validation_fraction" not in precompute.version_tree(_config(overrides, "validation_fraction=0"))


def test_version_follows_how_text_states_are_computed(setup, monkeypatch):
    """The same text weights give other states when the text computation changes (stages.text's
    TEXT_STATES_VERSION, e.g. the padding mask): that is a new output version."""
    from pipelines import precompute_encoders

    _, overrides = setup
    cfg = _config(overrides)
    assert precompute_encoders.encoder_sources(cfg)["text"]["states_version"] == precompute_encoders.TEXT_STATES_VERSION
    version = precompute.output_dir(cfg)
    monkeypatch.setattr(precompute_encoders, "TEXT_STATES_VERSION", precompute_encoders.TEXT_STATES_VERSION + 1)
    assert precompute.output_dir(cfg) != version
    # Without a text output the states do not matter.
    no_text = _config(overrides, "outputs=[semantic, stage_a]")
    assert "text" not in precompute.version_tree(no_text)["encoder_sha256"]


def test_decode_image_converts_modes_and_crops():
    rng = np.random.default_rng(1)
    for kind, mode in (("rgb", None), ("gray", "L"), ("cmyk", "CMYK"), ("rgba", "RGBA")):
        _, data = _image(kind, rng)
        pixels, converted = precompute_cpu.decode_image(data, 16)
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        assert converted == mode
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels, converted = precompute_cpu.decode_image(_encode(transparent, "PNG"), 8)
    assert converted == "RGBA" and (pixels == 255).all()  # transparent -> white, not black
    with pytest.raises(Image.DecompressionBombError, match="max_image_pixels 1000"):
        precompute_cpu.decode_image(_image("rgb", rng)[1], 16, max_pixels=1000)  # 56 x 40 = 2240 pixels
    for kind in ("corrupt", "truncated"):
        with pytest.raises(Exception) as failure:
            precompute_cpu.decode_image(_image(kind, rng)[1], 16)
        assert precompute_cpu._failure_reason(failure.value) == "decode_error"
